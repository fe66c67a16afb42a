//! Server metrics in the Prometheus text format (`GET /metrics`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

/// Counters and gauges shared by the handlers and the scheduler.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Requests answered, by HTTP status.
    responses: Mutex<Vec<(u16, u64)>>,
    /// Requests whose client went away before the answer.
    pub cancelled: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_images: AtomicU64,
    pub active_rows: AtomicU64,
    pub max_images: u64,
    pub kv_blocks_free: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub tokens_total: AtomicU64,
    pub images_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Sum over steps of the images in the step (average occupancy = this / steps / max).
    pub step_images_total: AtomicU64,
    /// Tokens per second over the last window.
    tokens_rate: Mutex<(Instant, u64, f64)>,
    latency: Mutex<(Vec<u64>, u64, f64)>,
}

impl Metrics {
    pub fn new(max_images: usize) -> Self {
        Metrics {
            started: Instant::now(),
            responses: Mutex::new(Vec::new()),
            cancelled: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active_images: AtomicU64::new(0),
            active_rows: AtomicU64::new(0),
            max_images: max_images as u64,
            kv_blocks_free: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            tokens_total: AtomicU64::new(0),
            images_total: AtomicU64::new(0),
            steps_total: AtomicU64::new(0),
            step_images_total: AtomicU64::new(0),
            tokens_rate: Mutex::new((Instant::now(), 0, 0.0)),
            latency: Mutex::new((vec![0; BUCKETS.len()], 0, 0.0)),
        }
    }

    /// Counts a response with `status`.
    pub fn response(&self, status: u16) {
        let mut r = self.responses.lock().expect("metrics lock");
        match r.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => r.push((status, 1)),
        }
    }

    /// Records the latency of a successful request.
    pub fn latency(&self, secs: f64) {
        let mut l = self.latency.lock().expect("metrics lock");
        for (i, &b) in BUCKETS.iter().enumerate() {
            if secs <= b {
                l.0[i] += 1;
            }
        }
        l.1 += 1;
        l.2 += secs;
    }

    /// Records one scheduler step that sampled `tokens` tokens for `images` images.
    pub fn step(&self, images: usize, tokens: usize) {
        self.steps_total.fetch_add(1, Ordering::Relaxed);
        self.step_images_total
            .fetch_add(images as u64, Ordering::Relaxed);
        let total = self
            .tokens_total
            .fetch_add(tokens as u64, Ordering::Relaxed)
            + tokens as u64;
        let mut r = self.tokens_rate.lock().expect("metrics lock");
        let dt = r.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            r.2 = (total - r.1) as f64 / dt;
            *r = (Instant::now(), total, r.2);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let mut responses = self.responses.lock().expect("metrics lock").clone();
        responses.sort();
        metric(
            "llamagen_requests_total",
            "counter",
            "Generation requests answered, by HTTP status.",
            responses
                .iter()
                .map(|(st, n)| (format!("{{status=\"{st}\"}}"), n.to_string()))
                .collect(),
        );
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "llamagen_requests_cancelled_total",
            "counter",
            "Requests whose client disconnected before the answer (their sequences freed).",
            one(g(&self.cancelled).to_string()),
        );
        metric(
            "llamagen_queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            one(g(&self.queue_depth).to_string()),
        );
        metric(
            "llamagen_active_images",
            "gauge",
            "Images being generated (a CFG image is two KV rows).",
            one(g(&self.active_images).to_string()),
        );
        metric(
            "llamagen_active_rows",
            "gauge",
            "KV rows (sequences) in the batch.",
            one(g(&self.active_rows).to_string()),
        );
        metric(
            "llamagen_batch_occupancy",
            "gauge",
            "Images in the batch over --max-sequences, now.",
            one(format!(
                "{:.4}",
                g(&self.active_images) as f64 / self.max_images.max(1) as f64
            )),
        );
        let steps = g(&self.steps_total);
        metric(
            "llamagen_batch_occupancy_mean",
            "gauge",
            "Mean images per step over --max-sequences, since start.",
            one(format!(
                "{:.4}",
                if steps == 0 {
                    0.0
                } else {
                    g(&self.step_images_total) as f64 / steps as f64 / self.max_images.max(1) as f64
                }
            )),
        );
        metric(
            "llamagen_kv_blocks_free",
            "gauge",
            "Free blocks of the paged KV pool.",
            one(g(&self.kv_blocks_free).to_string()),
        );
        metric(
            "llamagen_kv_blocks_total",
            "gauge",
            "Blocks of the paged KV pool.",
            one(g(&self.kv_blocks_total).to_string()),
        );
        metric(
            "llamagen_steps_total",
            "counter",
            "Scheduler steps (one forward each).",
            one(steps.to_string()),
        );
        metric(
            "llamagen_tokens_total",
            "counter",
            "Image tokens sampled.",
            one(g(&self.tokens_total).to_string()),
        );
        let rate = self.tokens_rate.lock().expect("metrics lock").2;
        metric(
            "llamagen_tokens_per_second",
            "gauge",
            "Image tokens sampled per second over the last window of about a second.",
            one(format!("{rate:.2}")),
        );
        metric(
            "llamagen_images_total",
            "counter",
            "Images generated and decoded.",
            one(g(&self.images_total).to_string()),
        );
        metric(
            "llamagen_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            one(format!("{:.1}", self.started.elapsed().as_secs_f64())),
        );
        let (buckets, count, sum) = self.latency.lock().expect("metrics lock").clone();
        let mut lines: Vec<(String, String)> = BUCKETS
            .iter()
            .zip(&buckets)
            .map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string()))
            .collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        lines.push(("_sum".into(), format!("{sum:.6}")));
        lines.push(("_count".into(), count.to_string()));
        metric(
            "llamagen_request_latency_seconds",
            "histogram",
            "Latency of successful generation requests, from arrival to the answer.",
            lines,
        );
        s
    }
}
