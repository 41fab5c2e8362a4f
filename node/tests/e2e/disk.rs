//! A node whose data disk runs short of space (a small tmpfs, filled for real): changes that
//! only add data are refused with a clear error, privacy changes still go through, live
//! locations and reads go on, and everything is taken again once space returns, with no restart.

use std::path::Path;
use std::time::Duration;

use nearby_client::proto::{ErrorCode, Event};
use nearby_client::ClientError;
use nearby_raft::test_support::SmallDisk;
use nearby_raft::wal::WalOptions;

use crate::util::{uid, until_ok, TestNode};

fn write_filler(path: &Path, bytes: usize) {
    std::fs::write(path, vec![7u8; bytes]).expect("filler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_short_of_space_refuses_growth_but_not_privacy_or_locations_and_recovers() {
    let tmp = tempfile::TempDir::new().expect("tmp");
    let disk = SmallDisk::mount(tmp.path(), 96 << 20).expect("this test fills a disk it mounts");
    let node = TestNode::start_on(
        disk.path().join("data"),
        WalOptions {
            min_free_bytes: 48 << 20,
            ..WalOptions::default()
        },
    )
    .await;
    let (ann, bob, cat) = (uid(0, 1), uid(1, 1), uid(2, 1));
    node.befriend(ann, bob).await;
    node.core.ensure_registered(cat).await.expect("register");
    let mut a = node.client(ann).await;
    let b = node.client(bob).await;
    a.at(52.5200, 13.4050).await;
    b.at(52.5470, 13.4050).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendEntered(_)));

    // About 60 MiB of other files: ~34 MiB stay free, under the 48 MiB floor but not full.
    let filler = disk.path().join("filler");
    write_filler(&filler, 60 << 20);
    let refused = a
        .client
        .add_friend(cat)
        .await
        .expect_err("refused while short of space");
    match &refused {
        ClientError::Server(body) => {
            assert_eq!(body.code, ErrorCode::Unavailable, "{refused}");
            assert!(body.message.contains("disk"), "the error says why: {refused}");
        }
        other => panic!("expected the node's refusal, got {other}"),
    }
    // Live locations and reads need no disk.
    b.at(52.5480, 13.4050).await;
    assert!(matches!(a.next_about(bob).await, Event::FriendMoved(_)));
    assert!(
        a.client
            .list_friends()
            .await
            .expect("list")
            .entries
            .iter()
            .any(|f| f.id == bob),
        "reads go on"
    );
    // Ending visibility is never refused for want of space.
    b.client.hide(ann).await.expect("hide goes through");
    assert!(matches!(a.next_about(bob).await, Event::FriendGone { .. }));

    std::fs::remove_file(&filler).expect("free the disk");
    until_ok(
        "space is back, the change should be taken",
        Duration::from_secs(5),
        || async {
            let r = a.client.add_friend(cat).await;
            if let Err(e) = &r {
                assert!(e.is_retryable(), "space is back, the change should be taken: {e}");
            }
            r
        },
    )
    .await;
    node.stop().await;
}
