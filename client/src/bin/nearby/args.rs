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
        ] {
            assert!(parse(argv).is_err(), "{argv:?} accepted");
        }
    }
}
