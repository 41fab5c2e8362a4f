//! `nearby`: the client command line, a thin layer over the SDK. `main` parses flags, sets up
//! logging (to stderr, `RUST_LOG`, default `warn`) and calls [`run`]; [`args`] holds the flags,
//! [`home`] the NEARBY_HOME files, [`output`] what is printed. `anyhow` is used here only.
//!
//! Output contract: with `--json`, stdout carries exactly one JSON document per command (`watch`:
//! one object per line) and nothing else; errors go to stderr as
//! `error: <code name> (<code>): <message>` (plus `{"error":{…}}` on stdout with `--json`), and
//! the exit status is 1 (2 for bad arguments).

// Printing is this binary's job; the workspace denies it in library code only.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod home;
mod output;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use nearby_client::proto::{Coord, GhostMode, NearbyPage, Outcome, Relation};
use nearby_client::{Backoff, Client, ClientConfig, ClientError, LocationAck, SdkEvent, UserId};
use serde_json::{json, Value};

use crate::args::{
    Args, Command, FollowCommand, FollowersCommand, FriendsCommand, GhostArg, HistoryCommand,
    LocationCommand, OnOff, ProfileCommand, TimeArg,
};
use crate::home::{Home, SetupError};

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let json = args.json;
    // One connection, a handful of tasks: a single-threaded runtime is plenty.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            report(
                &anyhow::Error::new(e).context("cannot start the async runtime"),
                json,
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// Prints `e` on stderr (and as JSON on stdout with `--json`).
fn report(e: &anyhow::Error, json: bool) {
    let (code, message, line) = if let Some(ce) = e.downcast_ref::<ClientError>() {
        let (code, message) = output::client_error_parts(ce);
        let line = match ce {
            ClientError::Server(body) => body.to_string(),
            other => format!("{}: {other}", other.kind_name()),
        };
        (code, message, line)
    } else if let Some(setup) = e.downcast_ref::<SetupError>() {
        ("setup", setup.0.clone(), format!("setup: {setup}"))
    } else {
        ("error", format!("{e:#}"), format!("{e:#}"))
    };
    eprintln!("error: {line}");
    if e.downcast_ref::<ClientError>()
        .is_some_and(ClientError::needs_login)
    {
        eprintln!("hint: run `nearby login --user ID` for a fresh token");
    }
    if json {
        println!("{}", output::error_json(code, &message));
    }
}

/// Prints one command's result: `value` with `--json`, else `text`.
fn emit(json: bool, value: &Value, text: &str) {
    if json {
        println!("{value}");
    } else if !text.is_empty() {
        println!("{text}");
    }
}

/// Runs one command.
async fn run(args: Args) -> anyhow::Result<()> {
    let home = Home::new(args.home.clone())?;
    let json = args.json;
    let user = args
        .user
        .ok_or_else(|| SetupError("no user: pass --user ID or set NEARBY_USER".into()))?;
    if args.command == Command::Login {
        return login(&args, &home, user).await;
    }
    let watching = matches!(args.command, Command::Watch { .. });
    let client = connect(&args, &home, user, watching).await?;
    let result = dispatch(&client, args.command, json).await;
    client.close().await;
    result
}

/// `nearby login`.
async fn login(args: &Args, home: &Home, user: UserId) -> anyhow::Result<()> {
    let endpoints = home.endpoints(args.endpoint.as_deref())?;
    let (token, expires_at) =
        Client::dev_login(&endpoints, &home.server_name()?, &home.ca_pem()?, user).await?;
    let path = home.save_token(user, &token)?;
    emit(
        args.json,
        &json!({"ok": true, "user": user, "expires_at": output::rfc3339(expires_at)}),
        &format!(
            "logged in as user {user}; token saved to {} (expires {})",
            path.display(),
            output::rfc3339(expires_at)
        ),
    );
    Ok(())
}

/// Connects as `user` with the files of `home`. Only `watch` reconnects: a one-shot command
/// fails fast and lets the caller retry.
async fn connect(args: &Args, home: &Home, user: UserId, reconnect: bool) -> anyhow::Result<Client> {
    let endpoints = home.endpoints(args.endpoint.as_deref())?;
    let mut config =
        ClientConfig::new(String::new(), home.ca_pem()?, user, home.token(user)?).with_endpoints(endpoints);
    config.server_name = home.server_name()?;
    config.client_name = concat!("nearby-cli/", env!("CARGO_PKG_VERSION")).to_string();
    config.reconnect = if reconnect {
        Backoff::default()
    } else {
        Backoff {
            max_attempts: Some(0),
            ..Backoff::default()
        }
    };
    // A node being replaced answers "retry" for a moment (a new leader is being elected); the
    // CLI waits that out, within a bound, instead of failing at once.
    config.connect_timeout = std::time::Duration::from_secs(3);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut attempt = 0u32;
    loop {
        match Client::connect(config.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                let pause = config.reconnect.delay(attempt);
                tracing::debug!(error = %e, ?pause, "cannot connect yet; retrying");
                attempt += 1;
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs a command that needs a connection.
async fn dispatch(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match command {
        Command::Login => unreachable!("handled before connecting"),
        Command::Location(LocationCommand::Set { lat, lon }) => {
            let (page, next_update_s) = match client.update_location(Coord { lat, lon }).await? {
                LocationAck::Started { page, next_update_s } => (page, next_update_s),
                // The node still held a live location: the session runs; show the page anyway.
                LocationAck::Located { next_update_s } => {
                    (client.list_nearby(None, None).await?, next_update_s)
                }
            };
            let text = format!(
                "location set; next update wanted in {next_update_s} s\n{}",
                output::page_text(&page, now, "no friend in range")
            );
            emit(json, &output::located_json(&page, next_update_s), &text);
        }
        Command::List { page: number } => {
            let (page, reached) = walk_pages(client, number).await?;
            let text = if reached < number {
                format!("no page {number}: there are {reached}")
            } else {
                output::page_text(&page, now, "no friend in range")
            };
            emit(json, &output::list_json(&page, number), &text);
        }
        Command::Watch { lat, lon } => {
            let at = lat.zip(lon).map(|(lat, lon)| Coord { lat, lon });
            watch(client, at, json).await?;
        }
        Command::Friends(FriendsCommand::Add { id }) => {
            change(json, client.add_friend(id).await?, Some(id));
        }
        Command::Friends(FriendsCommand::Remove { id }) => {
            change(json, client.remove_friend(id).await?, Some(id));
        }
        Command::Friends(FriendsCommand::List) => {
            let list = client.list_friends().await?;
            emit(
                json,
                &output::friend_list_json(&list),
                &output::friend_list_text(&list),
            );
        }
        Command::Share { state } => {
            change(json, client.set_sharing(state == OnOff::On).await?, None);
        }
        Command::Hide { id } => change(json, client.hide(id).await?, Some(id)),
        Command::Unhide { id } => change(json, client.unhide(id).await?, Some(id)),
        Command::Profile(ProfileCommand::SetName { name }) => {
            change(json, client.set_name(name).await?, None);
        }
        Command::Profile(ProfileCommand::SetRadius { meters }) => {
            change(json, client.set_radius(meters).await?, None);
        }
        Command::Discoverable { state } => {
            change(json, client.set_discoverable(state == OnOff::On).await?, None);
        }
        Command::Ghost { state } => {
            let mode = match state {
                GhostArg::On => GhostMode::On,
                GhostArg::Off => GhostMode::Off,
                GhostArg::For(d) => GhostMode::For { seconds: d.as_secs() },
            };
            let until = client.set_ghost(mode).await?;
            emit(json, &output::ghost_json(until), &output::ghost_text(until));
        }
        Command::Followers(FollowersCommand::Allow { id }) => {
            change(json, client.allow_follower(id).await?, Some(id));
        }
        Command::Followers(FollowersCommand::Revoke { id }) => {
            change(json, client.revoke_follower(id).await?, Some(id));
        }
        Command::Followers(FollowersCommand::List) => {
            let list = client.list_friends().await?;
            emit(
                json,
                &output::relation_list_json(&list, Relation::Follower, "followers"),
                &output::relation_list_text(&list, Relation::Follower, "nobody follows you"),
            );
        }
        Command::Follow(FollowCommand::List) => {
            let list = client.list_friends().await?;
            emit(
                json,
                &output::relation_list_json(&list, Relation::Following, "following"),
                &output::relation_list_text(&list, Relation::Following, "you follow nobody"),
            );
        }
        Command::Unfollow { id } => change(json, client.unfollow(id).await?, Some(id)),
        Command::History { action, since, until } => match action {
            Some(HistoryCommand::Delete) => change(json, client.delete_history().await?, None),
            Some(HistoryCommand::On) => change(json, client.set_history(true).await?, None),
            Some(HistoryCommand::Off) => change(json, client.set_history(false).await?, None),
            None => {
                let at = |t: Option<TimeArg>| {
                    t.map(|t| {
                        let when = match t {
                            TimeArg::At(t) => t,
                            TimeArg::Ago(d) => now.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH),
                        };
                        let ms = when
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                        nearby_client::Millis(ms)
                    })
                };
                let page = client.read_history(at(since), at(until), None).await?;
                emit(json, &output::history_json(&page), &output::history_text(&page));
            }
        },
        Command::Strangers { limit } => {
            let page = client.list_strangers(limit).await?;
            emit(
                json,
                &output::strangers_json(&page),
                &output::strangers_text(&page, now),
            );
        }
        Command::Ping => {
            let rtt = client.ping().await?;
            let ms = rtt.as_secs_f64() * 1000.0;
            emit(
                json,
                &json!({"ok": true, "rtt_ms": ms}),
                &format!("pong in {ms:.1} ms"),
            );
        }
    }
    Ok(())
}

fn change(json: bool, outcome: Outcome, other: Option<UserId>) {
    emit(
        json,
        &output::outcome_json(outcome),
        &output::outcome_text(outcome, other),
    );
}

/// Follows cursors to page `number` (1-based). Returns the page and the number of the last page
/// reached: fewer than `number` when the list is shorter (the page is then empty).
async fn walk_pages(client: &Client, number: u32) -> anyhow::Result<(NearbyPage, u32)> {
    let mut page = client.list_nearby(None, None).await?;
    let mut reached = 1;
    while reached < number {
        match page.next.take() {
            Some(cursor) => {
                page = client.list_nearby(Some(cursor), None).await?;
                reached += 1;
            }
            None => {
                return Ok((
                    NearbyPage {
                        friends: Vec::new(),
                        next: None,
                    },
                    reached,
                ))
            }
        }
    }
    Ok((page, reached))
}

/// `nearby watch`: prints events until Ctrl-C. With a location, sends it first (printing the
/// first page) and re-sends it at the node's cadence so the session stays active.
async fn watch(client: &Client, at: Option<Coord>, json: bool) -> anyhow::Result<()> {
    let mut events = client.events().context("the event stream was already taken")?;
    let mut names: HashMap<UserId, String> = HashMap::new();
    let mut cadence = Duration::from_secs(u64::from(client.session().next_update_s.max(1)));
    if let Some(at) = at {
        let page = match client.update_location(at).await? {
            LocationAck::Started { page, .. } => page,
            LocationAck::Located { next_update_s } => {
                cadence = Duration::from_secs(u64::from(next_update_s.max(1)));
                client.list_nearby(None, None).await?
            }
        };
        remember(&mut names, &page);
        let text = format!(
            "friends in range:\n{}",
            output::page_text(&page, SystemTime::now(), "  nobody yet")
        );
        emit(json, &output::watch_page_json(&page), &text);
    }
    if !json {
        eprintln!("watching; Ctrl-C to stop");
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let resend = tokio::time::sleep(cadence);
    tokio::pin!(resend);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            () = &mut resend, if at.is_some() => {
                if let Some(at) = at {
                    match client.update_location(at).await {
                        Ok(LocationAck::Located { next_update_s }) => {
                            cadence = Duration::from_secs(u64::from(next_update_s.max(1)));
                        }
                        Ok(LocationAck::Started { page, .. }) => remember(&mut names, &page),
                        // Retryable failures (a reconnect under way) are reported as events.
                        Err(e) if e.is_retryable() => tracing::debug!(%e, "location not sent"),
                        Err(e) => return Err(e.into()),
                    }
                }
                resend.as_mut().reset(tokio::time::Instant::now() + cadence);
            }
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                match &event {
                    SdkEvent::Resumed { page: Some(page) } => remember(&mut names, page),
                    SdkEvent::Event(nearby_client::proto::Event::Cadence { next_update_s }) => {
                        cadence = Duration::from_secs(u64::from((*next_update_s).max(1)));
                        resend.as_mut().reset(tokio::time::Instant::now() + cadence);
                    }
                    _ => {}
                }
                if json {
                    println!("{}", output::sdk_event_json(&event));
                } else {
                    println!("{}", output::sdk_event_text(&event, &names, SystemTime::now()));
                }
                if let SdkEvent::Closed(reason) = event {
                    return Err(reason.into());
                }
            }
        }
    }
}

fn remember(names: &mut HashMap<UserId, String>, page: &NearbyPage) {
    for f in &page.friends {
        names.insert(f.id, f.name.clone());
    }
}
