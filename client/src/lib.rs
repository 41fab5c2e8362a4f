//! The nearby client SDK: what a mobile app's networking layer embeds to talk to nearby.
//!
//! # Layout
//!
//! - [`proto`]: the wire protocol — messages and the frame codec, no I/O. The node uses it too.
//! - The async SDK (connect, authenticate, reconnect, follow redirects, send locations, receive
//!   events) and the `nearby` command line are being built on it.

pub mod proto;

pub use nearby_index::geo::{LatLng, Millis, UserId};
