//! What `docs/protocol.md` promises a client author, checked against the node where it can be:
//! the limits table against the code's constants, and the behaviours a review found the text
//! and the code disagreeing on.

use nearby_client::proto::frame::MAX_FRAME_LEN;
use nearby_client::proto::{Coord, Event};
use nearby_client::LocationAck;
use nearby_node::api::{Backend, MAX_PAGE};

use crate::util::{uid, TestNode};

const A: (f64, f64) = (52.5200, 13.4050);

fn protocol_doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md")
}

/// The row of the limits table (section 10) named `limit`.
fn limit_row(doc: &str, limit: &str) -> String {
    doc.lines()
        .find(|l| l.starts_with(&format!("| {limit} |")))
        .unwrap_or_else(|| panic!("docs/protocol.md has no limits row for {limit:?}"))
        .to_string()
}

/// `n` with thousands separators, as the document writes numbers.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn the_limits_table_states_the_code_s_limits() {
    let doc = protocol_doc();
    let page = limit_row(&doc, "page size");
    assert!(
        page.contains(&format!("1–{MAX_PAGE} entries")),
        "the page size row does not say 1–{MAX_PAGE}: {page}"
    );
    let frame = limit_row(&doc, "frame size");
    assert!(
        frame.contains(&grouped(MAX_FRAME_LEN)),
        "the frame size row does not say {}: {frame}",
        grouped(MAX_FRAME_LEN)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_size_above_the_limit_is_served_at_the_limit() {
    let node = TestNode::start().await;
    let me = uid(0, 300);
    let over = usize::from(MAX_PAGE) + 5;
    for i in 0..over as u64 {
        let f = uid((i % 4) as usize, 400 + i);
        node.befriend(me, f).await;
        node.core
            .update_location(
                f,
                Coord {
                    lat: A.0 + i as f64 * 0.0001,
                    lon: A.1,
                },
                false,
            )
            .await
            .expect("friend location");
    }
    let v = node.client(me).await;
    v.at(A.0, A.1).await;
    let page = v
        .client
        .list_nearby(None, Some(500))
        .await
        .expect("a page of 500 is not an error");
    assert_eq!(page.friends.len(), usize::from(MAX_PAGE));
    assert!(page.next.is_some(), "the rest is behind the cursor");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_location_is_answered_by_the_page_not_by_entered_events() {
    let node = TestNode::start().await;
    let (ann, bob) = (uid(0, 30), uid(1, 30));
    node.befriend(ann, bob).await;
    let b = node.client(bob).await;
    b.at(A.0 + 0.01, A.1).await;
    let mut a = node.client(ann).await;
    let page = match a.client.update_location(Coord { lat: A.0, lon: A.1 }).await {
        Ok(LocationAck::Started { page, .. }) => page,
        other => panic!("{other:?}"),
    };
    assert_eq!(page.friends.iter().map(|f| f.id).collect::<Vec<_>>(), vec![bob]);
    // Bob moves: the first event ann gets is that move — no FriendEntered came before it.
    b.at(A.0 + 0.02, A.1).await;
    let first = a.next().await;
    assert!(
        matches!(&first, Event::FriendMoved(p) if p.id == bob),
        "the first event after the page is {first:?}"
    );
    node.stop().await;
}
