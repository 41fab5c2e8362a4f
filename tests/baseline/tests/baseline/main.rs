//! The baseline through real parts: a real `redis-server` started on a free loopback port, the
//! real QUIC service over loopback, and SDK clients logging in with `DevLogin`.

mod live;
mod util;
