//! The retry queue between span building and the exporter: bounded in spans, drops the
//! oldest when full (counted), keeps order across retries, and an export loop with
//! exponential backoff that never blocks whoever pushes.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    counters::{OtelStats, SpanDrop},
    yielding::ExportYield,
};

/// A bounded FIFO that drops its oldest items to make room.
#[derive(Debug)]
pub struct RetryQueue<T> {
    items: VecDeque<T>,
    cap: usize,
}

impl<T> RetryQueue<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            items: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends `item`; returns how many of the oldest items were dropped for room (0 or 1).
    pub fn push(&mut self, item: T) -> u64 {
        self.items.push_back(item);
        self.trim()
    }

    /// Appends `items` in order; returns how many of the oldest items were dropped.
    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) -> u64 {
        self.items.extend(items);
        self.trim()
    }

    /// Removes and returns up to `max` of the oldest items, in order.
    pub fn take_batch(&mut self, max: usize) -> Vec<T> {
        let n = max.min(self.items.len());
        self.items.drain(..n).collect()
    }

    /// Puts a batch that failed back in front, in its order; returns how many of the oldest
    /// items were dropped because the queue filled up meanwhile.
    pub fn requeue_front(&mut self, batch: Vec<T>) -> u64 {
        for item in batch.into_iter().rev() {
            self.items.push_front(item);
        }
        self.trim()
    }

    /// Empties the queue, returning how many items it held.
    pub fn clear(&mut self) -> u64 {
        let n = self.items.len() as u64;
        self.items.clear();
        n
    }

    fn trim(&mut self) -> u64 {
        let over = self.items.len().saturating_sub(self.cap);
        self.items.drain(..over);
        over as u64
    }
}

/// Delay before the next attempt: doubles from `min` to `max`, with up to 25 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(0.25 * jitter_unit());
        (base + jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A number in [0, 1) from the SDK's random id generator (no extra RNG dependency).
fn jitter_unit() -> f64 {
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    let r = u64::from_be_bytes(RandomIdGenerator::default().new_span_id().to_bytes());
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// Sends a batch somewhere. Ok: how many of the batch the receiver refused for good (the
/// sender counts them as dropped); Err: the items to retry, in order.
pub trait BatchSender<T> {
    fn send(&mut self, batch: Vec<T>) -> impl std::future::Future<Output = Result<u64, Vec<T>>>;
}

/// Export loop tuning.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Most spans in one export call.
    pub max_batch: usize,
    /// Longest a span waits for its batch to fill.
    pub linger: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            linger: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// The queue shared by the producer (span building) and the export loop.
pub struct SharedQueue<T> {
    queue: Mutex<RetryQueue<T>>,
    notify: Notify,
    stats: Arc<OtelStats>,
    max_batch: usize,
    /// Items ever pushed.
    pushed: AtomicU64,
    /// The export thread's scheduling class, when it yields the CPU.
    yielding: Option<ExportYield>,
}

impl<T> SharedQueue<T> {
    pub fn new(cap: usize, max_batch: usize, stats: Arc<OtelStats>) -> Self {
        Self {
            queue: Mutex::new(RetryQueue::new(cap)),
            notify: Notify::new(),
            stats,
            max_batch,
            pushed: AtomicU64::new(0),
            yielding: None,
        }
    }

    /// The export loop makes its thread idle-class while it keeps up; pushers put it back
    /// to normal priority when spans pile up (see `yielding.rs`).
    pub fn with_yielding(mut self, yielding: ExportYield) -> Self {
        self.yielding = Some(yielding);
        self
    }

    /// On the export thread after a send (a failed batch back in the queue).
    fn sent(&self) {
        if let Some(y) = &self.yielding {
            y.sent(self.len());
        }
    }

    /// Times the export thread was put back to normal priority.
    pub fn rescues(&self) -> u64 {
        self.yielding.as_ref().map_or(0, ExportYield::rescues)
    }

    /// Items ever pushed (dropped ones included).
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RetryQueue<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Never blocks (beyond a short lock): drops the oldest span when full.
    pub fn push(&self, item: T) {
        self.pushed.fetch_add(1, Ordering::Relaxed);
        let (dropped, len) = {
            let mut q = self.lock();
            (q.push(item), q.len())
        };
        self.pushed_to(len, dropped);
    }

    /// [`SharedQueue::push`] for each of `items` (emptied), under one lock.
    pub fn push_all(&self, items: &mut Vec<T>) {
        if items.is_empty() {
            return;
        }
        self.pushed.fetch_add(items.len() as u64, Ordering::Relaxed);
        let (dropped, len) = {
            let mut q = self.lock();
            (q.extend(items.drain(..)), q.len())
        };
        self.pushed_to(len, dropped);
    }

    /// After a push left `len` items, `dropped` of the oldest having made room.
    fn pushed_to(&self, len: usize, dropped: u64) {
        if dropped > 0 {
            self.stats.dropped(SpanDrop::ExportQueueFull, dropped);
        }
        if let Some(y) = &self.yielding {
            y.queued(len);
        }
        if len >= self.max_batch {
            self.notify.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Wakes the export loop (e.g. to flush at shutdown).
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// Exports what is queued until `closing` is set and the queue is empty, or until
/// `deadline` (set once closing) passes; then counts what is left as dropped (shutdown).
/// Returns the number of spans lost at shutdown.
pub async fn export_loop<T, S: BatchSender<T>>(
    queue: Arc<SharedQueue<T>>,
    mut sender: S,
    cfg: LoopConfig,
    mut closing: tokio::sync::watch::Receiver<Option<Instant>>,
) -> u64 {
    let stats = queue.stats.clone();
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let mut linger_until = Instant::now() + cfg.linger;
    let mut retrying = false;
    if let Some(y) = &queue.yielding {
        if let Err(e) = y.start() {
            tracing::warn!("the export thread stays at normal priority: setting SCHED_IDLE: {e}");
        }
    }
    loop {
        let deadline = *closing.borrow();
        let len = queue.len();
        if let Some(d) = deadline {
            if let Some(y) = &queue.yielding {
                y.finish();
            }
            if len == 0 {
                return 0;
            }
            if Instant::now() >= d {
                let lost = queue.lock().clear();
                stats.dropped(SpanDrop::Shutdown, lost);
                return lost;
            }
        }
        let due = len >= cfg.max_batch
            || (len > 0 && Instant::now() >= linger_until)
            || (len > 0 && deadline.is_some());
        if due {
            let batch = queue.lock().take_batch(cfg.max_batch);
            let n = batch.len() as u64;
            if retrying {
                OtelStats::add(&stats.trace_export_retries, 1);
            }
            let result = match deadline {
                // At shutdown an export may not outlive the deadline.
                Some(d) => match tokio::time::timeout_at(d, sender.send(batch)).await {
                    Ok(r) => r,
                    Err(_) => {
                        OtelStats::add(&stats.trace_export_failures, 1);
                        stats.dropped(SpanDrop::Shutdown, n);
                        let lost = n + queue.lock().clear();
                        stats.dropped(SpanDrop::Shutdown, lost - n);
                        return lost;
                    }
                },
                None => sender.send(batch).await,
            };
            match result {
                Ok(refused) => {
                    OtelStats::add(&stats.spans_exported, n.saturating_sub(refused));
                    backoff.reset();
                    retrying = false;
                    linger_until = Instant::now() + cfg.linger;
                    queue.sent();
                }
                Err(failed) => {
                    OtelStats::add(&stats.trace_export_failures, 1);
                    OtelStats::add(&stats.spans_exported, n - failed.len() as u64);
                    let dropped = queue.lock().requeue_front(failed);
                    if dropped > 0 {
                        stats.dropped(SpanDrop::ExportQueueFull, dropped);
                    }
                    queue.sent();
                    retrying = true;
                    let wait = backoff.next_delay();
                    let until = Instant::now() + wait;
                    let until = deadline.map_or(until, |d| until.min(d));
                    // Sleep out the backoff; a shutdown request shortens it to its deadline.
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = closing.changed(), if deadline.is_none() => {}
                    }
                    linger_until = Instant::now();
                }
            }
            continue;
        }
        if len == 0 {
            linger_until = Instant::now() + cfg.linger;
        }
        tokio::select! {
            _ = queue.notify.notified() => {}
            _ = tokio::time::sleep_until(linger_until) => {}
            r = closing.changed() => {
                if r.is_err() && closing.borrow().is_none() {
                    // The closer vanished without a deadline: stop now.
                    let lost = queue.lock().clear();
                    stats.dropped(SpanDrop::Shutdown, lost);
                    return lost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_drops_oldest_and_counts() {
        let mut q = RetryQueue::new(3);
        assert_eq!(q.push(1), 0);
        assert_eq!(q.push(2), 0);
        assert_eq!(q.push(3), 0);
        assert_eq!(q.push(4), 1);
        assert_eq!(q.len(), 3);
        assert_eq!(q.take_batch(10), vec![2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn push_all_is_push_each_under_one_lock() {
        let stats = Arc::new(OtelStats::default());
        let q = SharedQueue::new(3, 2, stats.clone());
        let mut items = vec![1, 2];
        q.push_all(&mut items);
        assert!(items.is_empty());
        let mut items = vec![3, 4, 5];
        q.push_all(&mut items);
        // Bounded as push: the two oldest are dropped and counted.
        assert_eq!(q.pushed(), 5);
        assert_eq!(q.lock().take_batch(10), vec![3, 4, 5]);
        assert_eq!(stats.dropped_count(SpanDrop::ExportQueueFull), 2);
        q.push_all(&mut Vec::new());
        assert_eq!(q.pushed(), 5);
    }

    #[test]
    fn requeue_keeps_order_and_bound() {
        let mut q = RetryQueue::new(5);
        for i in 1..=5 {
            q.push(i);
        }
        let batch = q.take_batch(3); // 1,2,3 in flight
        assert_eq!(batch, vec![1, 2, 3]);
        q.push(6);
        q.push(7); // 4,5,6,7
                   // The failed batch goes back in front; the oldest (1, 2) no longer fit.
        assert_eq!(q.requeue_front(batch), 2);
        assert_eq!(q.take_batch(10), vec![3, 4, 5, 6, 7]);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for i in 0..12 {
            let d = b.next_delay();
            let base = Duration::from_millis(100) * 2u32.pow(i.min(6));
            let base = base.min(Duration::from_secs(5));
            assert!(
                d >= base && d <= (base.mul_f64(1.25)).min(Duration::from_secs(5)),
                "{i}: {d:?}"
            );
            assert!(d <= Duration::from_secs(5));
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(126));
    }

    /// A fake collector: fails the first `fail` calls, then accepts; records what arrived.
    struct Fake {
        fail: usize,
        calls: usize,
        got: Arc<Mutex<Vec<u32>>>,
    }

    impl BatchSender<u32> for Fake {
        async fn send(&mut self, batch: Vec<u32>) -> Result<u64, Vec<u32>> {
            self.calls += 1;
            if self.calls <= self.fail {
                return Err(batch);
            }
            self.got.lock().unwrap().extend(batch);
            Ok(0)
        }
    }

    fn cfg() -> LoopConfig {
        LoopConfig {
            max_batch: 4,
            linger: Duration::from_millis(50),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// Records the sending thread's scheduling policy at each send.
    struct PolicyProbe(std::sync::mpsc::Sender<i32>);

    impl BatchSender<u32> for PolicyProbe {
        async fn send(&mut self, _batch: Vec<u32>) -> Result<u64, Vec<u32>> {
            // SAFETY: reads this thread's policy.
            let _ = self.0.send(unsafe { libc::sched_getscheduler(0) });
            Ok(0)
        }
    }

    #[test]
    fn the_export_loop_runs_idle_class_until_spans_pile_up() {
        let yielding = ExportYield::new(4, 100).expect("root may change classes");
        let q = Arc::new(SharedQueue::new(100, 4, Arc::default()).with_yielding(yielding));
        let (sent_tx, sent) = std::sync::mpsc::channel();
        let (close, closing) = tokio::sync::watch::channel(None);
        let q2 = q.clone();
        let exporter = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Batches leave when full only (no partial batch from a slow test thread).
            let cfg = LoopConfig {
                linger: Duration::from_secs(600),
                ..cfg()
            };
            rt.block_on(export_loop(q2, PolicyProbe(sent_tx), cfg, closing))
        });
        let recv = || {
            sent.recv_timeout(Duration::from_secs(10))
                .expect("a batch was sent")
        };
        for i in 0..4 {
            q.push(i);
        }
        assert_eq!(recv(), libc::SCHED_IDLE, "a batch now and then: idle-class");
        // Four batches at once: the pusher puts the export thread back to normal.
        q.push_all(&mut (4..20).collect());
        assert_eq!(q.rescues(), 1);
        for _ in 0..4 {
            assert_eq!(recv(), libc::SCHED_OTHER);
        }
        close
            .send(Some(Instant::now() + Duration::from_secs(10)))
            .expect("loop alive");
        assert_eq!(exporter.join().expect("exporter"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_loses_nothing_within_the_bound_and_keeps_order() {
        let stats = Arc::new(OtelStats::default());
        let q = Arc::new(SharedQueue::new(100, 4, stats.clone()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            fail: 6,
            calls: 0,
            got: got.clone(),
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(export_loop(q.clone(), fake, cfg(), rx));
        for i in 0..50 {
            q.push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        tx.send(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert_eq!(task.await.unwrap(), 0);
        assert_eq!(*got.lock().unwrap(), (0..50).collect::<Vec<_>>());
        assert_eq!(OtelStats::get(&stats.spans_exported), 50);
        assert_eq!(OtelStats::get(&stats.trace_export_failures), 6);
        assert!(OtelStats::get(&stats.trace_export_retries) >= 6);
        for why in SpanDrop::ALL {
            assert_eq!(stats.dropped_count(why), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_bound_the_oldest_are_dropped_and_counted() {
        let stats = Arc::new(OtelStats::default());
        let q = Arc::new(SharedQueue::new(10, 4, stats.clone()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            fail: usize::MAX,
            calls: 0,
            got: got.clone(),
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(export_loop(q.clone(), fake, cfg(), rx));
        for i in 0..30 {
            q.push(i);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(q.len() <= 10);
        tx.send(Some(Instant::now() + Duration::from_secs(2)))
            .unwrap();
        let lost = task.await.unwrap();
        assert!(got.lock().unwrap().is_empty());
        // Every span is accounted for: dropped for room, or lost at shutdown.
        assert_eq!(stats.dropped_count(SpanDrop::ExportQueueFull) + lost, 30);
        assert_eq!(stats.dropped_count(SpanDrop::Shutdown), lost);
        assert!(lost > 0 && lost <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn kept_spans_are_the_newest_in_order() {
        let stats = Arc::new(OtelStats::default());
        let q = Arc::new(SharedQueue::new(8, 4, stats.clone()));
        let got = Arc::new(Mutex::new(Vec::new()));
        // Down long enough for 20 pushes to overflow the 8-span queue, then back.
        let fake = Fake {
            fail: 3,
            calls: 0,
            got: got.clone(),
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        for i in 0..20 {
            q.push(i);
        }
        assert_eq!(stats.dropped_count(SpanDrop::ExportQueueFull), 12);
        let task = tokio::spawn(export_loop(q.clone(), fake, cfg(), rx));
        tokio::time::sleep(Duration::from_secs(10)).await;
        tx.send(Some(Instant::now() + Duration::from_secs(1)))
            .unwrap();
        assert_eq!(task.await.unwrap(), 0);
        assert_eq!(*got.lock().unwrap(), (12..20).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn batches_wait_for_linger_or_size() {
        let stats = Arc::new(OtelStats::default());
        let q = Arc::new(SharedQueue::new(100, 4, stats.clone()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            fail: 0,
            calls: 0,
            got: got.clone(),
        };
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let _task = tokio::spawn(export_loop(q.clone(), fake, cfg(), rx));
        q.push(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(got.lock().unwrap().is_empty(), "waits for more");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*got.lock().unwrap(), vec![1], "sent after linger");
        for i in 2..=5 {
            q.push(i);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            *got.lock().unwrap(),
            vec![1, 2, 3, 4, 5],
            "a full batch goes at once"
        );
    }
}
