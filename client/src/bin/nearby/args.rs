//! Everything involving `nearby`'s flags and positional arguments: the clap definitions, and
//! nothing else (no I/O, no defaults read from disk).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use nearby_client::UserId;

/// nearby: see which friends are near you, live.
///
/// Reads the node's address and certificate from NEARBY_HOME (written by `nearby-node dev`),
/// and keeps each user's token there (written by `nearby login`).
#[derive(Debug, Parser)]
#[command(name = "nearby", version, propagate_version = true)]
pub(crate) struct Args {
    /// The user to act as.
    #[arg(long, global = true, env = "NEARBY_USER", value_name = "ID")]
    pub(crate) user: Option<UserId>,

    /// Print JSON instead of text: one document per command (`watch`: one object per line).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// The directory holding `endpoint`, `ca.pem`, `server_name` and `tokens/` [default: ~/.nearby].
    #[arg(long, global = true, env = "NEARBY_HOME", value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,

    /// The node to talk to, overriding NEARBY_HOME/endpoint.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub(crate) endpoint: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The commands.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum Command {
    /// Get a token from a dev node for --user and store it in NEARBY_HOME/tokens/.
    Login,
    /// Your location.
    #[command(subcommand)]
    Location(LocationCommand),
    /// Friends in range, nearest first.
    List {
        /// Which page (1-based; 20 friends a page unless the node says otherwise).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        page: u32,
    },
    /// Print live events until Ctrl-C, one line each.
    Watch {
        /// Also send this latitude (and keep re-sending it at the node's cadence).
        #[arg(long, requires = "lon", allow_negative_numbers = true)]
        lat: Option<f64>,
        /// Also send this longitude.
        #[arg(long, requires = "lat", allow_negative_numbers = true)]
        lon: Option<f64>,
    },
    /// Friends and friend requests.
    #[command(subcommand)]
    Friends(FriendsCommand),
    /// Turn location sharing on or off.
    Share {
        /// `on` or `off`.
        state: OnOff,
    },
    /// Hide from one friend.
    Hide {
        /// The friend's user id.
        id: UserId,
    },
    /// Stop hiding from one friend.
    Unhide {
        /// The friend's user id.
        id: UserId,
    },
    /// Your profile.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Let opted-in strangers nearby see you (a name, a distance rounded to 500 m and a
    /// pseudonym; never your id or position), or stop it.
    Discoverable {
        /// `on` or `off`.
        state: OnOff,
    },
    /// Discoverable strangers nearby (never friends): a pseudonym, a name, a distance rounded
    /// to 500 m, nearest first, and how many more.
    Strangers {
        /// How many to show (the node's page size by default, at most 100).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=100))]
        limit: Option<u16>,
    },
    /// Ghost mode: hidden from everyone for DURATION (`3h`, `90min`), until `off`, or no more.
    Ghost {
        /// `on`, `off`, or a duration such as `3h`.
        #[arg(value_parser = parse_ghost)]
        state: GhostArg,
    },
    /// Your location history: read it (by time range), delete all of it, or turn it on or off.
    #[command(args_conflicts_with_subcommands = true)]
    History {
        /// `delete`, `on` or `off`; without one, prints the history.
        #[command(subcommand)]
        action: Option<HistoryCommand>,
        /// From: an RFC 3339 time, or a duration ago (`2h`); the beginning by default.
        #[arg(long, value_parser = parse_time)]
        since: Option<TimeArg>,
        /// Until: an RFC 3339 time, or a duration ago; now by default.
        #[arg(long, value_parser = parse_time)]
        until: Option<TimeArg>,
    },
    /// Who may follow you (one-way: they see you, you do not see them).
    #[command(subcommand)]
    Followers(FollowersCommand),
    /// Who you follow.
    #[command(subcommand)]
    Follow(FollowCommand),
    /// Stop following a user.
    Unfollow {
        /// The user you follow.
        id: UserId,
    },
    /// Check the connection to the node.
    Ping,
}

/// `nearby location …`.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum LocationCommand {
    /// Send your location; prints the friends in range.
    Set {
        /// Latitude in degrees (-90..=90).
        #[arg(allow_negative_numbers = true)]
        lat: f64,
        /// Longitude in degrees (-180..=180).
        #[arg(allow_negative_numbers = true)]
        lon: f64,
    },
}

/// `nearby friends …`.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum FriendsCommand {
    /// Ask a user to be friends, or accept their request.
    Add {
        /// Their user id.
        id: UserId,
    },
    /// End a friendship, or cancel / decline a request.
    Remove {
        /// Their user id.
        id: UserId,
    },
    /// Your friends and pending requests.
    List,
}

/// `nearby profile …`.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum ProfileCommand {
    /// Change your display name.
    SetName {
        /// The new name (1–64 characters).
        name: String,
    },
    /// Choose a search radius, in metres (the node caps it at its own).
    SetRadius {
        /// The radius in metres.
        meters: u32,
    },
}

/// `nearby followers …`.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum FollowersCommand {
    /// Let a user follow you.
    Allow {
        /// Their user id.
        id: UserId,
    },
    /// Stop letting a user follow you (at once).
    Revoke {
        /// Their user id.
        id: UserId,
    },
    /// The users you let follow you.
    List,
}

/// `nearby history …`.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub(crate) enum HistoryCommand {
    /// Delete all of your location history, from every node's disk.
    Delete,
    /// Record your locations (the default).
    On,
    /// Stop recording your locations.
    Off,
}

/// A time given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeArg {
    /// This instant.
    At(std::time::SystemTime),
    /// That long before now.
    Ago(std::time::Duration),
}

fn parse_time(s: &str) -> Result<TimeArg, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(TimeArg::At(t));
    }
    humantime::parse_duration(s)
        .map(TimeArg::Ago)
        .map_err(|_| format!("{s:?}: an RFC 3339 time (2026-12-01T10:00:00Z) or a duration ago (2h)"))
}

/// `nearby follow …`.
#[derive(Debug, Subcommand, PartialEq)]
pub(crate) enum FollowCommand {
    /// The users who let you follow them.
    List,
}

/// `nearby ghost` 's argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GhostArg {
    /// Until turned off.
    On,
    /// Visible again.
    Off,
    /// For a while.
    For(std::time::Duration),
}

fn parse_ghost(s: &str) -> Result<GhostArg, String> {
    match s {
        "on" => Ok(GhostArg::On),
        "off" => Ok(GhostArg::Off),
        _ => match humantime::parse_duration(s) {
            Ok(d) if d.as_secs() >= 1 => Ok(GhostArg::For(d)),
            Ok(_) => Err("a ghost mode lasts at least 1 s".into()),
            Err(e) => Err(format!("`on`, `off` or a duration such as `3h` ({e})")),
        },
    }
}

/// `on` / `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    /// Share.
    On,
    /// Stop sharing.
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("nearby").chain(args.iter().copied()))
    }

    #[test]
    fn the_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn negative_coordinates_parse_as_numbers() {
        let args = parse(&["--user", "7", "location", "set", "-33.86", "-151.2"]).expect("parse");
        assert_eq!(args.user, Some(7));
        assert_eq!(
            args.command,
            Command::Location(LocationCommand::Set {
                lat: -33.86,
                lon: -151.2
            })
        );
    }

    #[test]
    fn global_flags_go_anywhere() {
        let args = parse(&[
            "list",
            "--page",
            "3",
            "--json",
            "--user",
            "9",
            "--endpoint",
            "h:1",
        ])
        .expect("parse");
        assert!(args.json);
        assert_eq!(args.user, Some(9));
        assert_eq!(args.endpoint.as_deref(), Some("h:1"));
        assert_eq!(args.command, Command::List { page: 3 });
        assert_eq!(
            parse(&["list"]).expect("parse").command,
            Command::List { page: 1 }
        );
    }

    #[test]
    fn subcommands_parse() {
        let cases: &[(&[&str], Command)] = &[
            (&["login"], Command::Login),
            (
                &["friends", "add", "5"],
                Command::Friends(FriendsCommand::Add { id: 5 }),
            ),
            (
                &["friends", "remove", "5"],
                Command::Friends(FriendsCommand::Remove { id: 5 }),
            ),
            (&["friends", "list"], Command::Friends(FriendsCommand::List)),
            (&["share", "on"], Command::Share { state: OnOff::On }),
            (&["share", "off"], Command::Share { state: OnOff::Off }),
            (&["hide", "3"], Command::Hide { id: 3 }),
            (&["unhide", "3"], Command::Unhide { id: 3 }),
            (
                &["profile", "set-name", "Ann Lee"],
                Command::Profile(ProfileCommand::SetName {
                    name: "Ann Lee".into(),
                }),
            ),
            (
                &["profile", "set-radius", "500"],
                Command::Profile(ProfileCommand::SetRadius { meters: 500 }),
            ),
            (&["watch"], Command::Watch { lat: None, lon: None }),
            (
                &["watch", "--lat", "-1.5", "--lon", "2"],
                Command::Watch {
                    lat: Some(-1.5),
                    lon: Some(2.0),
                },
            ),
            (&["ping"], Command::Ping),
            (
                &["discoverable", "on"],
                Command::Discoverable { state: OnOff::On },
            ),
            (&["ghost", "on"], Command::Ghost { state: GhostArg::On }),
            (&["ghost", "off"], Command::Ghost { state: GhostArg::Off }),
            (
                &["ghost", "3h"],
                Command::Ghost {
                    state: GhostArg::For(std::time::Duration::from_secs(3 * 3600)),
                },
            ),
            (
                &["followers", "allow", "4"],
                Command::Followers(FollowersCommand::Allow { id: 4 }),
            ),
            (
                &["followers", "revoke", "4"],
                Command::Followers(FollowersCommand::Revoke { id: 4 }),
            ),
            (&["followers", "list"], Command::Followers(FollowersCommand::List)),
            (&["follow", "list"], Command::Follow(FollowCommand::List)),
            (&["unfollow", "4"], Command::Unfollow { id: 4 }),
            (&["strangers"], Command::Strangers { limit: None }),
            (
                &["history"],
                Command::History {
                    action: None,
                    since: None,
                    until: None,
                },
            ),
            (
                &["history", "--since", "2h"],
                Command::History {
                    action: None,
                    since: Some(TimeArg::Ago(std::time::Duration::from_secs(7200))),
                    until: None,
                },
            ),
            (
                &["history", "delete"],
                Command::History {
                    action: Some(HistoryCommand::Delete),
                    since: None,
                    until: None,
                },
            ),
            (
                &["history", "off"],
                Command::History {
                    action: Some(HistoryCommand::Off),
                    since: None,
                    until: None,
                },
            ),
            (
                &["strangers", "--limit", "5"],
                Command::Strangers { limit: Some(5) },
            ),
        ];
        for (argv, want) in cases {
            assert_eq!(&parse(argv).expect("parse").command, want, "{argv:?}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        for argv in [
            &["list", "--page", "0"][..],
            &["share", "maybe"],
            &["friends", "add", "bob"],
            &["friends", "add", "-3"],
            &["location", "set", "1"],
            &["watch", "--lat", "1"],
            &["--user", "x", "ping"],
            &["ghost", "0s"],
            &["ghost", "maybe"],
            &["discoverable", "yes"],
            &["strangers", "--limit", "0"],
            &["history", "--since", "yesterday-ish"],
            &["history", "delete", "--since", "2h"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?} accepted");
        }
    }
}
