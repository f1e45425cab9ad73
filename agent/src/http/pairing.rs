//! Requests waiting for their responses, in order (which covers pipelining), plus the
//! connection-wide state of an [`super::Http1Stream`].

use std::collections::VecDeque;

use super::exchange::{Exchange, ExchangeRole, Failure};
use super::stats::{DropReason, StreamStats};
use super::stream::StreamConfig;

#[derive(Debug, Default)]
pub(super) struct Pairing {
    pub(super) config: StreamConfig,
    /// Known once a message showed which side sends requests.
    pub(super) role: Option<ExchangeRole>,
    /// The connection left HTTP/1.x (101 Switching Protocols, CONNECT tunnel).
    pub(super) upgraded: bool,
    pub(super) stats: StreamStats,
    next_seq: u32,
    /// Oldest first; each entry has its `seq`.
    pending: VecDeque<(u32, Pending)>,
    /// `seq` of the oldest request when its response is being read.
    responding: Option<u32>,
    /// A request was dropped without a place in line (not even its request line could
    /// be read): the peer may still answer it (a 400), and that answer, arriving with
    /// nothing waiting, is not counted a second time.
    pub(super) unreadable_request_dropped: bool,
}

/// A request waiting for its response.
#[derive(Debug)]
pub(super) struct Pending {
    /// HEAD: the response has no body whatever its headers say.
    pub(super) head_request: bool,
    /// CONNECT: a 2xx response turns the connection into a tunnel.
    pub(super) connect: bool,
    /// `None` once dropped (already counted): the entry only keeps responses in order.
    pub(super) exchange: Option<Exchange>,
}

/// What a response adds to its exchange.
#[derive(Clone, Copy, Debug)]
pub(super) struct FinishedResponse {
    pub(super) status: u16,
    pub(super) start_ns: u64,
    pub(super) end_ns: u64,
    pub(super) body_bytes: u64,
    pub(super) keep_alive: bool,
}

/// What a response needs to know about the request it answers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Answered {
    pub(super) head_request: bool,
    pub(super) connect: bool,
}

impl Pairing {
    pub(super) fn new(config: StreamConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub(super) fn release_idle_buffers(&mut self) {
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.pending.capacity()
    }

    pub(super) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Queues a request; returns its `seq`. Beyond `max_pending` the oldest is dropped.
    pub(super) fn push(&mut self, pending: Pending) -> u32 {
        if self.pending.len() >= self.config.max_pending {
            if let Some((seq, oldest)) = self.pending.pop_front() {
                if self.responding == Some(seq) {
                    self.responding = None;
                }
                if oldest.exchange.is_some() {
                    self.stats.record(DropReason::PipelineOverflow);
                }
            }
        }
        self.unreadable_request_dropped = false;
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.pending.push_back((seq, pending));
        seq
    }

    /// A final response starts: it answers the oldest request (`None`: nothing waits).
    pub(super) fn answer_oldest(&mut self) -> Option<Answered> {
        // One left half-answered (its response was cut short) will not be answered now.
        if let Some(stale) = self.take_answered() {
            if stale.exchange.is_some() {
                self.stats.record(DropReason::NoResponse);
            }
        }
        let (seq, oldest) = self.pending.front()?;
        self.responding = Some(*seq);
        Some(Answered {
            head_request: oldest.head_request,
            connect: oldest.connect,
        })
    }

    /// Completes the exchange being answered and emits it.
    pub(super) fn finish_response(&mut self, response: FinishedResponse, out: &mut Vec<Exchange>) {
        let Some(mut exchange) = self.take_answered().and_then(|p| p.exchange) else {
            return;
        };
        exchange.status = response.status;
        exchange.response_start_ns = response.start_ns;
        exchange.end_ns = response.end_ns;
        exchange.response_body_bytes = response.body_bytes;
        exchange.keep_alive = response.keep_alive;
        out.push(exchange);
    }

    pub(super) fn set_request_body(&mut self, seq: u32, bytes: u64) {
        if let Some(exchange) = self.request_mut(seq).and_then(|p| p.exchange.as_mut()) {
            exchange.request_body_bytes = bytes;
        }
    }

    /// Drops request `seq` (already counted) but keeps its place for its response.
    pub(super) fn drop_request(&mut self, seq: u32) {
        if let Some(pending) = self.request_mut(seq) {
            pending.exchange = None;
        }
    }

    /// Drops the exchange being answered (already counted).
    pub(super) fn drop_answered(&mut self) {
        self.take_answered();
    }

    /// A response was lost (already counted): the oldest request goes with it.
    pub(super) fn drop_oldest(&mut self) {
        self.responding = None;
        self.pending.pop_front();
    }

    /// All but the newest request will not be answered.
    pub(super) fn abandon_all_but_newest(&mut self) {
        self.responding = None;
        while self.pending.len() > 1 {
            if let Some((_, missed)) = self.pending.pop_front() {
                self.count_abandoned(&missed, DropReason::NoResponse);
            }
        }
    }

    /// No waiting request will be answered: the connection ended at `end_ns`. Each one
    /// sent after `after_ns` is emitted as a failed exchange; an earlier one (whose answer
    /// may have been missed) is counted (a placeholder of one already counted is neither).
    pub(super) fn fail_all(&mut self, end_ns: u64, after_ns: u64, out: &mut Vec<Exchange>) {
        self.responding = None;
        for (_, mut pending) in std::mem::take(&mut self.pending) {
            match pending.exchange.take_if(|e| e.start_ns > after_ns) {
                Some(mut exchange) => {
                    exchange.end_ns = end_ns;
                    exchange.failure = Some(Failure::NoResponse);
                    out.push(exchange);
                }
                None => self.count_abandoned(&pending, DropReason::NoResponse),
            }
        }
    }

    /// No waiting request will be answered.
    pub(super) fn abandon_all(&mut self) {
        self.abandon_all_for(DropReason::NoResponse);
    }

    /// The same, counted as `reason`.
    pub(super) fn abandon_all_for(&mut self, reason: DropReason) {
        self.responding = None;
        for (_, pending) in std::mem::take(&mut self.pending) {
            self.count_abandoned(&pending, reason);
        }
    }

    /// HTTP/1.x is over on this connection.
    pub(super) fn upgrade(&mut self) {
        self.upgraded = true;
        self.abandon_all();
    }

    fn count_abandoned(&mut self, pending: &Pending, reason: DropReason) {
        if pending.exchange.is_some() {
            self.stats.record(reason);
        }
    }

    fn request_mut(&mut self, seq: u32) -> Option<&mut Pending> {
        // Usually the newest one: search from the back.
        let entry = self.pending.iter_mut().rev().find(|(s, _)| *s == seq);
        entry.map(|(_, pending)| pending)
    }

    /// Takes the request whose response is being read out of the queue.
    fn take_answered(&mut self) -> Option<Pending> {
        let seq = self.responding.take()?;
        let answered = match self.pending.front() {
            Some((first, _)) if *first == seq => self.pending.pop_front().map(|(_, p)| p),
            _ => None,
        };
        // After a burst of pipelining, give the memory back.
        if self.pending.is_empty() && self.pending.capacity() > 8 {
            self.pending = VecDeque::new();
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> Pending {
        Pending {
            head_request: false,
            connect: false,
            exchange: Some(Exchange {
                method: "GET".into(),
                path: path.into(),
                ..Exchange::empty(ExchangeRole::Server)
            }),
        }
    }

    fn response(status: u16) -> FinishedResponse {
        FinishedResponse {
            status,
            start_ns: 1,
            end_ns: 2,
            body_bytes: 3,
            keep_alive: true,
        }
    }

    #[test]
    fn responses_answer_requests_oldest_first() {
        let mut p = Pairing::default();
        let first = p.push(request("/a"));
        p.push(request("/b"));
        p.set_request_body(first, 7);
        let mut out = Vec::new();
        for status in [200, 404] {
            assert!(p.answer_oldest().is_some());
            p.finish_response(response(status), &mut out);
        }
        assert!(p.answer_oldest().is_none());
        let got: Vec<_> = out
            .iter()
            .map(|e| (e.path.as_str(), e.status, e.request_body_bytes))
            .collect();
        assert_eq!(got, [("/a", 200, 7), ("/b", 404, 0)]);
        assert_eq!(p.stats.total_drops(), 0);
    }

    #[test]
    fn dropped_requests_keep_their_place_silently() {
        let mut p = Pairing::default();
        let dropped = p.push(request("/dropped"));
        p.push(request("/kept"));
        p.drop_request(dropped);
        let mut out = Vec::new();
        p.answer_oldest();
        p.finish_response(response(400), &mut out);
        assert!(out.is_empty());
        p.answer_oldest();
        p.finish_response(response(200), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].path, "/kept");
    }

    #[test]
    fn abandoning_counts_only_live_requests() {
        let mut p = Pairing::default();
        for path in ["/1", "/2", "/3"] {
            p.push(request(path));
        }
        p.push(Pending {
            head_request: false,
            connect: false,
            exchange: None,
        });
        p.abandon_all_but_newest();
        assert_eq!(p.stats.drops(DropReason::NoResponse), 3);
        assert_eq!(p.pending_len(), 1);
        p.abandon_all();
        assert_eq!(p.stats.drops(DropReason::NoResponse), 3);
        assert_eq!(p.pending_len(), 0);
    }

    #[test]
    fn overflow_drops_the_oldest() {
        let mut p = Pairing::new(StreamConfig {
            max_pending: 2,
            ..StreamConfig::default()
        });
        for path in ["/1", "/2", "/3"] {
            p.push(request(path));
        }
        assert_eq!(p.stats.drops(DropReason::PipelineOverflow), 1);
        assert_eq!(p.pending_len(), 2);
    }
}
