//! What a group's replicated data must offer the state machine adapter ([`Machine`]), and what
//! the adapter publishes about each applied entry ([`AppliedEntry`]).
//!
//! Both kinds of group — shard groups ([`crate::GroupState`]) and the meta group
//! ([`crate::ClusterMap`]) — share one log format ([`Payload`]), one WAL and one transport; a
//! group's kind is fixed when it is opened, by the type of its machine.

use nearby_index::error::CodecError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::meta::ClusterMap;
use crate::shard::state::GroupState;
use crate::{LogId, Payload, Reply};

/// A group's replicated data: plain, deterministic, no I/O, no clock.
pub trait Machine: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// A short name of the kind, for logs and the group's manifest.
    const KIND: &'static str;

    /// Applies one entry's payload, the entry at log index `index`. A payload for the other kind
    /// of group changes nothing and returns [`Reply::WrongKind`].
    fn apply_payload(&mut self, payload: &Payload, index: u64) -> Reply;

    /// The state as a snapshot's data.
    fn encode_state(&self) -> Result<Vec<u8>, CodecError> {
        nearby_index::codec::encode(self)
    }

    /// The state from a snapshot's data, written by this version or an earlier one.
    fn decode_state(bytes: &[u8]) -> Result<Self, CodecError> {
        nearby_index::codec::decode(bytes)
    }
}

impl Machine for GroupState {
    const KIND: &'static str = "shard";

    fn apply_payload(&mut self, payload: &Payload, index: u64) -> Reply {
        match payload {
            Payload::Shard(cmd) => Reply::Shard(self.apply(cmd, index)),
            Payload::Meta(_) => Reply::WrongKind,
        }
    }

    fn encode_state(&self) -> Result<Vec<u8>, CodecError> {
        self.encode_versioned()
    }

    fn decode_state(bytes: &[u8]) -> Result<Self, CodecError> {
        GroupState::decode_versioned(bytes)
    }
}

impl Machine for ClusterMap {
    const KIND: &'static str = "meta";

    fn apply_payload(&mut self, payload: &Payload, _index: u64) -> Reply {
        match payload {
            Payload::Meta(cmd) => Reply::Meta(self.apply(cmd)),
            Payload::Shard(_) => Reply::WrongKind,
        }
    }

    fn encode_state(&self) -> Result<Vec<u8>, CodecError> {
        self.encode_versioned()
    }

    fn decode_state(bytes: &[u8]) -> Result<Self, CodecError> {
        ClusterMap::decode_versioned(bytes)
    }
}

/// What the state machine tells a subscriber (see [`crate::Replica::subscribe`]), in log order.
#[derive(Clone, Debug)]
pub enum AppliedEntry {
    /// A normal entry was applied.
    Command {
        /// Its log id.
        log_id: LogId,
        /// What it carried.
        payload: Payload,
        /// What applying it returned.
        reply: Reply,
    },
    /// The state was replaced by a snapshot (a follower that fell behind): anything derived
    /// from earlier entries must be rebuilt from the state.
    Snapshot {
        /// The last entry the snapshot covers.
        last: Option<LogId>,
    },
}
