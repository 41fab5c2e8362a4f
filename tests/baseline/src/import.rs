//! Bulk import of a seed (`nearby_raft::seed::Seed`, the file `nearby-node dev --import` reads)
//! into Redis: names with `MSET`, relation sets with one `SADD key m1 m2 …` per user and set,
//! sent in pipelines of [`PIPELINE`] commands, so a large world loads in seconds.

use std::collections::HashMap;

use nearby_index::geo::UserId;
use nearby_raft::seed::Seed;
use redis::aio::MultiplexedConnection;

use crate::keys;
use crate::BaselineError;

/// Commands per pipeline.
const PIPELINE: usize = 1_000;
/// Members per `SADD` and pairs per `MSET`.
const CHUNK: usize = 1_000;

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Users named.
    pub users: usize,
    /// Friendships (each pair once).
    pub friendships: usize,
    /// One-way grants.
    pub follows: usize,
    /// Redis commands sent.
    pub commands: usize,
}

/// Writes `seed` through `conn`. Existing names are overwritten; relations are added.
pub async fn import(conn: &mut MultiplexedConnection, seed: &Seed) -> Result<Imported, BaselineError> {
    let mut sets: HashMap<String, Vec<UserId>> = HashMap::new();
    for &(a, b) in &seed.friendships {
        sets.entry(keys::friends(a)).or_default().push(b);
        sets.entry(keys::friends(b)).or_default().push(a);
    }
    for &(user, follower) in &seed.follows {
        sets.entry(keys::followers(user)).or_default().push(follower);
        sets.entry(keys::following(follower)).or_default().push(user);
    }
    let mut pipe = redis::pipe();
    let mut queued = 0;
    let mut commands = 0;
    for chunk in seed.users.chunks(CHUNK) {
        let pairs: Vec<(String, &str)> = chunk.iter().map(|(u, n)| (keys::name(*u), n.as_str())).collect();
        pipe.cmd("MSET").arg(&pairs).ignore();
        queued += 1;
        if queued >= PIPELINE {
            commands += flush(conn, &mut pipe, &mut queued).await?;
        }
    }
    for (key, members) in &sets {
        for chunk in members.chunks(CHUNK) {
            pipe.cmd("SADD").arg(key).arg(chunk).ignore();
            queued += 1;
            if queued >= PIPELINE {
                commands += flush(conn, &mut pipe, &mut queued).await?;
            }
        }
    }
    commands += flush(conn, &mut pipe, &mut queued).await?;
    Ok(Imported {
        users: seed.users.len(),
        friendships: seed.friendships.len(),
        follows: seed.follows.len(),
        commands,
    })
}

async fn flush(
    conn: &mut MultiplexedConnection,
    pipe: &mut redis::Pipeline,
    queued: &mut usize,
) -> Result<usize, BaselineError> {
    let n = std::mem::take(queued);
    if n > 0 {
        pipe.query_async::<()>(conn)
            .await
            .map_err(BaselineError::redis("import pipeline"))?;
        pipe.clear();
    }
    Ok(n)
}
