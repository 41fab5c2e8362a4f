//! The connection server's Pub/Sub layer: a small pool of Redis connections in subscribed mode,
//! shared by every session of the process, with a local table `channel → local users`, as real
//! connection servers multiplex many sessions over few Redis connections.
//!
//! - A channel lives on exactly one pool connection, chosen by a hash of its name, so the
//!   `SUBSCRIBE`/`UNSUBSCRIBE` of a channel are ordered on one socket. Redis is told to subscribe
//!   only when a channel's first local user arrives, and to unsubscribe when its last leaves.
//! - Each connection speaks RESP3 and hands every pushed message, without blocking, to a
//!   **bounded** queue (`queue` messages); a worker task per connection drains it into
//!   [`Deliver`]. When a queue is full the message is dropped and counted — Redis Pub/Sub is
//!   at-most-once anyway, and this is the same choice Redis makes for a slow subscriber (it
//!   disconnects it at its output-buffer limit), without unbounded memory here.
//! - A lost connection is reported through [`Deliver::connection_lost`]; the pool does not
//!   resubscribe by itself (the backend closes the sessions, whose clients reconnect and
//!   resubscribe).
//!
//! Never awaits while holding the table's lock; `order` (an async lock per connection) is held
//! across a `SUBSCRIBE`, so that table changes and Redis commands happen in the same order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nearby_index::geo::UserId;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};

use crate::keys::Channel;
use crate::BaselineError;

/// Where the pool's workers hand messages.
pub trait Deliver: Send + Sync + 'static {
    /// A message on `channel` for the local `users` subscribed to it.
    fn deliver(&self, channel: Channel, payload: &[u8], users: &[UserId]);
    /// Pool connection `index` is gone.
    fn connection_lost(&self, index: usize);
}

struct Conn {
    redis: MultiplexedConnection,
    /// Serialises this connection's subscription changes (see the module doc).
    order: tokio::sync::Mutex<()>,
    /// Channel → local users subscribed to it.
    table: Mutex<HashMap<Channel, Vec<UserId>>>,
}

/// What one pool connection's push callback forwards to its worker: a message's
/// `[channel, payload]`.
struct Pushed(Vec<Value>);

/// The pool (see the module doc).
pub struct PubSubPool {
    conns: Vec<Conn>,
    dropped: Arc<AtomicU64>,
}

/// Channels in one `SUBSCRIBE`: keeps each command and its confirmations small.
const BATCH: usize = 512;

impl PubSubPool {
    /// Opens `n` connections to `client` (RESP3), each with a bounded queue of `queue` messages,
    /// and returns the pool and the receivers for [`PubSubPool::spawn_workers`].
    pub async fn connect(
        client: &redis::Client,
        n: usize,
        queue: usize,
    ) -> Result<(PubSubPool, Vec<Receiver>), BaselineError> {
        let dropped = Arc::new(AtomicU64::new(0));
        let mut conns = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let (tx, rx) = mpsc::channel::<PushedMsg>(queue.max(1));
            // A separate signal, so a full queue cannot swallow the news of a lost connection.
            let lost = Arc::new(Notify::new());
            let lost_tx = Arc::clone(&lost);
            let counter = Arc::clone(&dropped);
            // Runs inside the connection's reader: never blocks.
            let sender = move |info: PushInfo| -> Result<(), std::convert::Infallible> {
                match info.kind {
                    PushKind::Message if tx.try_send(PushedMsg(Pushed(info.data))).is_err() => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    PushKind::Disconnection => lost_tx.notify_one(),
                    _ => {}
                }
                Ok(())
            };
            let config = AsyncConnectionConfig::new().set_push_sender(sender);
            let redis = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(BaselineError::redis("open a Pub/Sub connection"))?;
            conns.push(Conn {
                redis,
                order: tokio::sync::Mutex::new(()),
                table: Mutex::new(HashMap::new()),
            });
            receivers.push(Receiver { rx, lost });
        }
        Ok((PubSubPool { conns, dropped }, receivers))
    }

    /// Starts one worker per connection, draining its queue into `to`.
    pub fn spawn_workers<D: Deliver>(
        self: &Arc<Self>,
        receivers: Vec<Receiver>,
        to: Arc<D>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        receivers
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                let pool = Arc::clone(self);
                let to = Arc::clone(&to);
                tokio::spawn(async move {
                    let mut users = Vec::new();
                    loop {
                        tokio::select! {
                            m = r.rx.recv() => match m {
                                Some(PushedMsg(Pushed(data))) => pool.dispatch(i, &data, &mut users, &*to),
                                None => return,
                            },
                            () = r.lost.notified() => {
                                to.connection_lost(i);
                                return;
                            }
                        }
                    }
                })
            })
            .collect()
    }

    fn dispatch(&self, i: usize, data: &[Value], users: &mut Vec<UserId>, to: &impl Deliver) {
        let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) = (data.first(), data.get(1))
        else {
            return;
        };
        let Some(channel) = Channel::parse(name) else {
            return;
        };
        users.clear();
        if let Some(list) = lock(&self.conns[i].table).get(&channel) {
            users.extend_from_slice(list);
        }
        if !users.is_empty() {
            to.deliver(channel, payload, users);
        }
    }

    /// Messages dropped because a worker's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Channels Redis currently has this process subscribed to.
    pub fn channels(&self) -> usize {
        self.conns.iter().map(|c| lock(&c.table).len()).sum()
    }

    fn conn_of(&self, ch: Channel) -> usize {
        (ch.spread() % self.conns.len() as u64) as usize
    }

    fn group(&self, channels: impl IntoIterator<Item = Channel>) -> HashMap<usize, Vec<Channel>> {
        let mut by: HashMap<usize, Vec<Channel>> = HashMap::new();
        for ch in channels {
            by.entry(self.conn_of(ch)).or_default().push(ch);
        }
        by
    }

    /// Subscribes `user` to `channels`; Redis is told about channels new to this process.
    pub async fn subscribe(
        &self,
        user: UserId,
        channels: impl IntoIterator<Item = Channel>,
    ) -> Result<(), BaselineError> {
        for (i, chans) in self.group(channels) {
            let conn = &self.conns[i];
            let _order = conn.order.lock().await;
            let fresh: Vec<String> = {
                let mut table = lock(&conn.table);
                chans
                    .into_iter()
                    .filter(|ch| {
                        let list = table.entry(*ch).or_default();
                        let first = list.is_empty();
                        if !list.contains(&user) {
                            list.push(user);
                        }
                        first
                    })
                    .map(|ch| ch.to_string())
                    .collect()
            };
            let mut redis = conn.redis.clone();
            for chunk in fresh.chunks(BATCH) {
                redis
                    .subscribe(chunk)
                    .await
                    .map_err(BaselineError::redis("SUBSCRIBE"))?;
            }
        }
        Ok(())
    }

    /// Unsubscribes `user` from `channels`; Redis is told about channels no local user wants.
    pub async fn unsubscribe(
        &self,
        user: UserId,
        channels: impl IntoIterator<Item = Channel>,
    ) -> Result<(), BaselineError> {
        for (i, chans) in self.group(channels) {
            let conn = &self.conns[i];
            let _order = conn.order.lock().await;
            let empty: Vec<String> = {
                let mut table = lock(&conn.table);
                let mut seen = HashSet::new();
                chans
                    .into_iter()
                    .filter(|ch| seen.insert(*ch))
                    .filter(|ch| match table.get_mut(ch) {
                        Some(list) => {
                            list.retain(|u| *u != user);
                            if list.is_empty() {
                                table.remove(ch);
                                true
                            } else {
                                false
                            }
                        }
                        None => false,
                    })
                    .map(|ch| ch.to_string())
                    .collect()
            };
            let mut redis = conn.redis.clone();
            for chunk in empty.chunks(BATCH) {
                redis
                    .unsubscribe(chunk)
                    .await
                    .map_err(BaselineError::redis("UNSUBSCRIBE"))?;
            }
        }
        Ok(())
    }
}

/// A pushed item on its way from a connection to its worker (opaque).
pub struct PushedMsg(Pushed);

/// The worker end of one pool connection (opaque): its bounded queue and its loss signal.
pub struct Receiver {
    rx: mpsc::Receiver<PushedMsg>,
    lost: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
