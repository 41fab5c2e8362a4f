//! The nearby client SDK: what a mobile app's networking layer embeds to talk to nearby —
//! connect, authenticate, follow redirects, reconnect and resume, send locations, receive
//! events — and the `nearby` command line built on it.
//!
//! ```no_run
//! # async fn demo(ca_pem: String, token: String) -> Result<(), nearby_client::ClientError> {
//! use nearby_client::{Client, ClientConfig, SdkEvent};
//! use nearby_client::proto::Coord;
//!
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7300", ca_pem, 7, token)).await?;
//! let mut events = client.events().expect("taken once");
//! client.update_location(Coord { lat: 48.8566, lon: 2.3522 }).await?;
//! while let Some(event) = events.recv().await {
//!     if let SdkEvent::Closed(_) = event { break; }
//! }
//! # Ok(()) }
//! ```
//!
//! See `docs/sdk.md` for the connection life cycle and the command line.
//!
//! # Layout
//!
//! - [`proto`]: the wire protocol — messages and the frame codec, no I/O. The node uses it too.
//! - [`config`]: [`ClientConfig`] and the reconnection [`Backoff`]; plain data and arithmetic.
//! - [`error`]: [`ClientError`], every way a call fails, with the node's stable error codes.
//! - `tls`: QUIC/TLS client settings (TLS 1.3, rustls with *ring*, ALPN `nearby/1`).
//! - `connection`: quinn streams ⟷ frames, dialling and the opening exchange with redirects;
//!   the only module that touches sockets.
//! - [`client`]: [`Client`], the cloneable handle, and the background driver that owns the
//!   connection, matches responses to requests, reconnects with backoff and resumes.
//! - `src/bin/nearby/`: the `nearby` command line (the only place `anyhow` is used).

pub mod client;
pub mod config;
mod connection;
pub mod error;
pub mod proto;
pub mod tls;

pub use self::client::{Client, LinkStats, LocationAck, SdkEvent};
pub use self::config::{Backoff, ClientConfig, DEFAULT_SERVER_NAME};
pub use self::error::ClientError;
pub use nearby_index::geo::{LatLng, Millis, UserId};
