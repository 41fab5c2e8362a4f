//! Messages the codec bench measures, and the byte-level examples printed in
//! `docs/protocol.md`. Shared by the bench (`codec.rs`) and a test (`client/tests/sdk`), so the
//! document cannot drift from the codec: the test checks both the encoding and that every
//! example is printed in the document.

#![allow(dead_code)]

use nearby_client::proto::{
    frame, Coord, Event, FriendPosition, NearbyFriend, NearbyPage, Relation, Request, RequestFrame, Response,
    ResponseFrame, PROTOCOL_VERSION,
};
use nearby_index::geo::Millis;
use serde::Serialize;

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn update_location() -> RequestFrame {
    RequestFrame {
        id: 1_234,
        request: Request::UpdateLocation {
            at: Coord {
                lat: 52.520_008,
                lon: 13.404_954,
            },
        },
    }
}

pub(crate) fn friend_moved() -> Event {
    Event::FriendMoved(FriendPosition {
        id: 1_000_042,
        at: Coord {
            lat: 52.531_2,
            lon: 13.388_6,
        },
        distance_m: 1_723.4,
        updated_at: Millis(1_764_072_000_123),
    })
}

pub(crate) fn nearby_page() -> ResponseFrame {
    let friends = (0..20u64)
        .map(|i| NearbyFriend {
            id: 1_000_000 + i * 7_919,
            relation: Relation::Friend,
            name: format!("Friend {i:02}"),
            distance_m: 150.0 + 370.5 * i as f64,
            updated_at: Millis(1_764_072_000_000 + i * 1_337),
        })
        .collect();
    ResponseFrame {
        id: 7,
        response: Response::Nearby(NearbyPage {
            friends,
            // A real second-page cursor is ~60 bytes of base64url.
            next: Some("AQGdJ4Vr8u2LQEKTr3pU0dE6lUx2n1WcG4x3jzC7mQm7b8d9sQ5nE0cXkQ".into()),
        }),
    }
}

pub(crate) fn examples() -> Vec<(&'static str, Vec<u8>)> {
    use nearby_client::proto::{ErrorBody, ErrorCode, SessionInfo};
    #[derive(Serialize)]
    struct Claims {
        user: u64,
        expires_at: u64,
    }
    vec![
        (
            "ping",
            frame::to_bytes(&RequestFrame {
                id: 1,
                request: Request::Ping,
            })
            .expect("e"),
        ),
        (
            "hello",
            frame::to_bytes(&RequestFrame {
                id: 0,
                request: Request::Hello {
                    version: PROTOCOL_VERSION,
                    user: 42,
                    token: "v1.abc.xyz".into(),
                    client: "demo".into(),
                },
            })
            .expect("e"),
        ),
        (
            "list_nearby",
            frame::to_bytes(&RequestFrame {
                id: 300,
                request: Request::ListNearby {
                    cursor: None,
                    page_size: Some(20),
                },
            })
            .expect("e"),
        ),
        (
            "welcome",
            frame::to_bytes(&ResponseFrame {
                id: 0,
                response: Response::Welcome(SessionInfo {
                    user: 42,
                    radius_m: 8_000,
                    ttl_s: 600,
                    page_size: 20,
                    next_update_s: 0,
                }),
            })
            .expect("e"),
        ),
        (
            "error_bad_frame",
            frame::to_bytes(&ResponseFrame {
                id: 0,
                response: Response::Error(ErrorBody {
                    code: ErrorCode::BadFrame,
                    message: "x".into(),
                }),
            })
            .expect("e"),
        ),
        (
            "error_already_auth",
            frame::to_bytes(&ResponseFrame {
                id: 5,
                response: Response::Error(ErrorBody {
                    code: ErrorCode::AlreadyAuthenticated,
                    message: String::new(),
                }),
            })
            .expect("e"),
        ),
        (
            "shutdown",
            frame::to_bytes(&Event::Shutdown {
                reconnect_after_ms: 1_500,
                redirect: None,
            })
            .expect("e"),
        ),
        (
            "set_sharing",
            frame::to_bytes(&RequestFrame {
                id: 2,
                request: Request::SetSharing { on: true },
            })
            .expect("e"),
        ),
        (
            "claims",
            nearby_index::codec::encode(&Claims {
                user: 42,
                expires_at: 1_764_158_400_000,
            })
            .expect("e"),
        ),
    ]
}

/// The byte-level examples of `docs/protocol.md`, exactly as printed there.
pub(crate) const DOCUMENTED: &[(&str, &str)] = &[
    ("ping", "00 00 00 02 01 0b"),
    (
        "hello",
        "00 00 00 14 00 00 02 2a 0a 76 31 2e 61 62 63 2e 78 79 7a 04 64 65 6d 6f",
    ),
    ("list_nearby", "00 00 00 07 fb 2c 01 02 00 01 14"),
    ("welcome", "00 00 00 0b 00 00 2a fb 40 1f fb 58 02 14 00"),
    ("error_bad_frame", "00 00 00 05 00 07 01 01 78"),
    ("error_already_auth", "00 00 00 04 05 07 0f 00"),
    ("shutdown", "00 00 00 05 06 fb dc 05 00"),
    ("set_sharing", "00 00 00 03 02 06 01"),
    ("claims", "2a fd 00 e6 08 c0 9a 01 00 00"),
    (
        "update_location",
        "00 00 00 14 fb d2 04 01 45 d4 44 9f 8f 42 4a 40 ce c4 74 21 56 cf 2a 40",
    ),
    (
        "friend_moved",
        "00 00 00 27 00 fc 6a 42 0f 00 4e d1 91 5c fe 43 4a 40 82 73 46 94 f6 c6 2a 40 \
         9a 99 99 99 99 ed 9a 40 fd 7b 8a e2 ba 9a 01 00 00",
    ),
];

pub(crate) fn check_documented_examples() {
    let mut got: Vec<(&str, Vec<u8>)> = examples();
    got.push(("update_location", frame::to_bytes(&update_location()).expect("e")));
    got.push(("friend_moved", frame::to_bytes(&friend_moved()).expect("e")));
    for ((name, bytes), (doc_name, doc_hex)) in got.iter().zip(DOCUMENTED) {
        assert_eq!(name, doc_name);
        let doc_hex = doc_hex.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            hex(bytes),
            doc_hex,
            "{name} no longer encodes as docs/protocol.md says"
        );
    }
    assert_eq!(got.len(), DOCUMENTED.len());
    assert_eq!(frame::to_bytes(&nearby_page()).expect("e").len(), 727);
}
