//! Adapts kernel data events to the HTTP/1.x stream parser of one connection.
use agent_common::DIR_INGRESS;

use crate::{
    capture::events::DataEvent,
    http::{Chunk, Direction, Exchange, Http1Stream},
    stats::Stats,
};

pub struct ConnAssembler {
    stream: Http1Stream,
}

impl ConnAssembler {
    pub fn new() -> Self {
        Self {
            stream: Http1Stream::new(),
        }
    }

    /// Feeds one data event; drop counts go to `stats`.
    pub fn on_data(&mut self, d: &DataEvent<'_>, out: &mut Vec<Exchange>, stats: &Stats) {
        let chunk = Chunk {
            direction: if d.header.direction == DIR_INGRESS {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            data: d.payload,
            total: d.header.total as usize,
            tail: d.tail(),
            ts_ns: d.header.header.ts_ns,
        };
        if let Err(e) = self.stream.on_chunk(&chunk, out) {
            tracing::trace!(error = %e, "http stream reset");
        }
        self.flush_stats(stats);
    }

    pub fn on_close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>, stats: &Stats) {
        self.stream.on_close(ts_ns, out);
        self.flush_stats(stats);
    }

    fn flush_stats(&mut self, stats: &Stats) {
        if self.stream.stats().total_drops() > 0 {
            stats.add_stream(&self.stream.take_stats());
        }
    }

    pub fn stream(&self) -> &Http1Stream {
        &self.stream
    }
}

impl Default for ConnAssembler {
    fn default() -> Self {
        Self::new()
    }
}
