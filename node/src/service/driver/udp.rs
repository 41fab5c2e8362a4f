//! Datagrams out in batches: the transmits of many connections gathered into one buffer and
//! handed to the kernel in one `sendmmsg(2)`, each message with Generic Segmentation Offload
//! (`UDP_SEGMENT`) where a connection had several packets of one size for one peer.
//!
//! quinn sends one transmit per `sendmsg` from each connection's own task; here a driver wake-up
//! that produced pushes for a hundred sessions costs one system call. The load simulator's
//! batched client driver sends through the same batches ([`send_all`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// At most this many messages go in one `sendmmsg` (Linux's `UIO_MAXIOV` is 1024).
pub const MAX_MESSAGES: usize = 128;

/// One message of a batch: where it goes and which bytes of the batch's buffer it is.
#[derive(Clone, Copy, Debug)]
struct Message {
    to: SocketAddr,
    start: usize,
    len: usize,
    /// Set when the message is several datagrams of this size (the last may be shorter).
    segment: Option<u16>,
}

/// Transmits gathered for one `sendmmsg`.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    messages: Vec<Message>,
    /// Messages before this one are sent.
    sent: usize,
}

/// `cmsghdr` space for one `UDP_SEGMENT` value, aligned as the kernel wants.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 32]);

impl Batch {
    /// Whether the batch holds nothing unsent.
    pub fn is_empty(&self) -> bool {
        self.sent == self.messages.len()
    }

    /// Whether the batch should go out before more is added.
    pub fn is_full(&self) -> bool {
        self.messages.len() >= MAX_MESSAGES
    }

    /// Messages waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.messages.len() - self.sent
    }

    /// Adds `data` for `to`: one datagram, or datagrams of `segment` bytes each (GSO).
    pub fn push(&mut self, to: SocketAddr, data: &[u8], segment: Option<usize>) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        let segment = segment
            .filter(|&s| s < data.len())
            .and_then(|s| u16::try_from(s).ok());
        self.messages.push(Message {
            to,
            start,
            len: data.len(),
            segment,
        });
    }

    /// Moves every packet `q` has to send at `now` into the batch, `segments` at most per
    /// transmit (`scratch` is quinn-proto's room for one), sending the batch on `socket` whenever
    /// it fills; `on_call` hears how many messages each `sendmmsg` carried.
    pub async fn take_transmits(
        &mut self,
        q: &mut quinn_proto::Connection,
        now: std::time::Instant,
        segments: usize,
        scratch: &mut Vec<u8>,
        socket: &tokio::net::UdpSocket,
        mut on_call: impl FnMut(usize),
    ) -> io::Result<()> {
        loop {
            scratch.clear();
            let Some(t) = q.poll_transmit(now, segments, scratch) else {
                return Ok(());
            };
            self.push_transmit(&t, scratch);
            if self.is_full() {
                send_all(socket, self, &mut on_call).await?;
            }
        }
    }

    /// Adds what quinn-proto wrote into `buf` for transmit `t`.
    pub fn push_transmit(&mut self, t: &quinn_proto::Transmit, buf: &[u8]) {
        self.push(t.destination, &buf[..t.size], t.segment_size);
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.messages.clear();
        self.sent = 0;
        // A burst (a handshake flight to many clients at once) may have grown the buffer; an
        // idle driver gives it back.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
    }

    /// Sends what is waiting with as few `sendmmsg` calls as the kernel allows. `WouldBlock`
    /// when the socket's buffer is full: what is left stays for the next call. A message the
    /// kernel refuses for itself (no route, too large) is dropped — QUIC sends it again — and
    /// counted in the result's second field.
    /// `on_call` hears how many messages each successful call carried.
    pub fn send(
        &mut self,
        socket: BorrowedFd<'_>,
        mut on_call: impl FnMut(usize),
    ) -> io::Result<(usize, usize)> {
        let (mut sent, mut dropped) = (0, 0);
        while !self.is_empty() {
            match sendmmsg(socket, &self.buf, &self.messages[self.sent..]) {
                Ok(n) => {
                    on_call(n);
                    self.sent += n;
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let m = self.messages[self.sent];
                    tracing::debug!(to = %m.to, len = m.len, segment = ?m.segment, error = %e, "a datagram was not sent");
                    self.sent += 1;
                    dropped += 1;
                }
            }
        }
        self.clear();
        Ok((sent, dropped))
    }
}

/// Sends everything in `batch` on `socket`, waiting for room in the socket's buffer when it is
/// full; `on_call` hears how many messages each `sendmmsg` carried.
pub async fn send_all(
    socket: &tokio::net::UdpSocket,
    batch: &mut Batch,
    mut on_call: impl FnMut(usize),
) -> io::Result<()> {
    loop {
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            batch.send(socket.as_fd(), &mut on_call)
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// Hands connection `q`'s endpoint events to `endpoint` and its answers back: whether the
/// connection is drained (its slot is free) and whether an answer came back (drive it again).
pub fn endpoint_events(
    endpoint: &mut quinn_proto::Endpoint,
    handle: quinn_proto::ConnectionHandle,
    q: &mut quinn_proto::Connection,
) -> (bool, bool) {
    let (mut drained, mut again) = (false, false);
    while let Some(event) = q.poll_endpoint_events() {
        drained |= event.is_drained();
        if let Some(back) = endpoint.handle_event(handle, event) {
            q.handle_event(back);
            again = true;
        }
    }
    (drained, again)
}

/// Receive buffer per message of a `recvmmsg` (room for GRO's coalesced datagrams): a receive
/// buffer for [`receive`] is this times [`quinn_udp::BATCH_SIZE`].
pub const RECV_SLOT: usize = 64 * 1024;

/// Reads datagrams until the socket is empty or `rounds` `recvmmsg` calls are done, handing each
/// datagram (GRO's coalesced ones split again) to `each` with its metadata. `buf` is the
/// messages' room: [`RECV_SLOT`] bytes per message, no allocation per call.
pub fn receive(
    socket: &tokio::net::UdpSocket,
    state: &quinn_udp::UdpSocketState,
    buf: &mut [u8],
    rounds: usize,
    mut each: impl FnMut(&quinn_udp::RecvMeta, &[u8]),
) {
    for _ in 0..rounds {
        let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let received = {
            let mut slots = buf.chunks_mut(RECV_SLOT);
            let mut iovs: [std::io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                std::array::from_fn(|_| std::io::IoSliceMut::new(slots.next().unwrap_or_default()));
            socket.try_io(tokio::io::Interest::READABLE, || {
                state.recv(socket.into(), &mut iovs, &mut metas)
            })
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                // ICMP errors surface here on some kernels; the next datagram is fine.
                tracing::debug!(error = %e, "socket receive error");
                continue;
            }
        };
        for (i, meta) in metas.iter().take(n).enumerate() {
            let data = &buf[i * RECV_SLOT..i * RECV_SLOT + meta.len];
            for datagram in data.chunks(meta.stride.max(1)) {
                each(meta, datagram);
            }
        }
    }
}

/// One `sendmmsg(2)` of `messages` (at most [`MAX_MESSAGES`] of them) over `buf`: how many the
/// kernel took.
fn sendmmsg(socket: BorrowedFd<'_>, buf: &[u8], messages: &[Message]) -> io::Result<usize> {
    let messages = &messages[..messages.len().min(MAX_MESSAGES)];
    let addrs: Vec<socket2::SockAddr> = messages.iter().map(|m| socket2::SockAddr::from(m.to)).collect();
    let mut iovs: Vec<libc::iovec> = messages
        .iter()
        .map(|m| libc::iovec {
            iov_base: buf[m.start..m.start + m.len].as_ptr() as *mut libc::c_void,
            iov_len: m.len,
        })
        .collect();
    let mut controls = vec![Control([0; 32]); messages.len()];
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        // SAFETY: an all-zero `msghdr` is valid (null pointers, zero lengths).
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
        hdr.msg_namelen = addrs[i].len();
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        if let Some(segment) = m.segment {
            let control = &mut controls[i];
            hdr.msg_control = control.0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
            // SAFETY: `hdr` points at `control`, which is 32 bytes, aligned to 8, and at least
            // CMSG_SPACE(2) = 24 bytes on every Linux ABI: the first header and its two bytes of
            // data lie inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
            }
        }
        headers.push(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
    // SAFETY: `headers` holds `headers.len()` initialised entries whose pointers (addresses,
    // iovecs, control data, payload) all point into vectors and slices alive until this returns.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn receiver() -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        s
    }

    #[test]
    fn one_call_sends_to_many_peers() {
        let (a, b) = (receiver(), receiver());
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut batch = Batch::default();
        for i in 0..10u8 {
            let to = if i % 2 == 0 { &a } else { &b };
            batch.push(to.local_addr().expect("addr"), &[i; 40], None);
        }
        assert_eq!(batch.len(), 10);
        let (sent, dropped) = batch.send(sender.as_fd(), |_| {}).expect("send");
        assert_eq!((sent, dropped), (10, 0));
        assert!(batch.is_empty());
        let mut buf = [0u8; 100];
        for (socket, first) in [(&a, 0u8), (&b, 1)] {
            for k in 0..5u8 {
                let (n, _) = socket.recv_from(&mut buf).expect("recv");
                assert_eq!(n, 40);
                assert_eq!(
                    buf[0],
                    first + 2 * k,
                    "datagrams arrive in order, each to its peer"
                );
            }
        }
    }

    #[test]
    fn segmented_messages_arrive_as_separate_datagrams() {
        let a = receiver();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut batch = Batch::default();
        let data: Vec<u8> = (0..250u8).collect();
        batch.push(a.local_addr().expect("addr"), &data, Some(100));
        batch.push(a.local_addr().expect("addr"), b"after", None);
        let (sent, _) = batch.send(sender.as_fd(), |_| {}).expect("send");
        assert_eq!(sent, 2);
        let mut buf = [0u8; 300];
        let sizes: Vec<usize> = (0..4).map(|_| a.recv_from(&mut buf).expect("recv").0).collect();
        assert_eq!(
            sizes,
            vec![100, 100, 50, 5],
            "GSO cut the first message at 100 bytes"
        );
    }

    #[test]
    fn a_refused_message_is_dropped_and_the_rest_still_go() {
        let a = receiver();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut batch = Batch::default();
        // An IPv6 destination on an IPv4 socket: the kernel refuses that message only.
        batch.push("[::1]:9".parse().expect("addr"), b"nowhere", None);
        batch.push(a.local_addr().expect("addr"), b"somewhere", None);
        let (sent, dropped) = batch.send(sender.as_fd(), |_| {}).expect("send");
        assert_eq!((sent, dropped), (1, 1));
        let mut buf = [0u8; 100];
        let (n, _) = a.recv_from(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"somewhere");
    }
}
