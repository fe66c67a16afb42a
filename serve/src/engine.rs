//! The generation engine behind the HTTP handlers: a bounded queue, one scheduler thread that
//! runs continuous batching over a paged KV cache (`llamagen_train::sample::BatchDecoder`), one
//! VQ thread that decodes finished images in batches off the token loop, and (t2i) one T5
//! thread that encodes the prompts of concurrent requests together.
//!
//! Invariants enforced here:
//! - At most `max_queue` requests wait for a slot; a submission beyond that is refused
//!   (`QueueFull`, HTTP 429) and never enqueued.
//! - Requests are admitted first come, first served, image by image, at token boundaries (between
//!   two steps), while fewer than `max_sequences` images are active and the KV pool has blocks
//!   for the image's whole length; an image that cannot start waits, and so does every request
//!   behind it.
//! - A request whose client has gone (its result receiver dropped, or its cancel flag set) is
//!   removed from the queue and its active images are dropped at the next token boundary,
//!   their KV blocks returned to the pool.
//! - After `shutdown`, the scheduler finishes everything queued and active, then the threads
//!   exit.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device, Tensor};
use llamagen_encode::VqModel;
use llamagen_train::Gpt;
use llamagen_train::sample::{BatchDecoder, ImageJob};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, ServeError};
use crate::metrics::Metrics;

/// One generated image.
#[derive(Debug, Clone)]
pub struct ImageOut {
    /// Index of the image in its request.
    pub index: usize,
    /// The seed of its generator.
    pub seed: u64,
    pub tokens: Vec<u32>,
    /// The decoded image as PNG bytes.
    pub png: Vec<u8>,
}

/// An image or why there is none.
pub type ImageResult = std::result::Result<ImageOut, String>;

/// A request handed to the engine: one job per image, the channel its images go to, and the
/// flag its handler sets when the client disconnects.
pub struct Submission {
    pub jobs: Vec<ImageJob>,
    pub results: mpsc::UnboundedSender<ImageResult>,
    pub cancel: Arc<AtomicBool>,
}

impl Submission {
    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.results.is_closed()
    }
}

/// Engine settings (the server's flags).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most requests waiting for a slot.
    pub max_queue: usize,
    /// Most images generated at once (a CFG image is two KV rows).
    pub max_sequences: usize,
    /// Positions per KV block.
    pub kv_block_size: usize,
    /// Most images per VQ decoder call.
    pub vq_batch: usize,
}

struct Queued {
    sub: Submission,
    next: usize,
}

struct State {
    queue: VecDeque<Queued>,
    stop: bool,
    /// Why the engine stopped working (a panic in the scheduler or VQ thread): new requests are
    /// refused with it and `/health` reports it.
    failed: Option<String>,
}

impl Shared {
    /// Marks the engine failed: stops it, and drops every queued request (each handler sees its
    /// channel close and answers with an error instead of waiting forever).
    fn fail(&self, thread: &str, panic: Box<dyn std::any::Any + Send>) {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("llamagen serve: the {thread} thread panicked: {why}");
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.failed = Some(format!("the {thread} thread failed: {why}"));
        st.stop = true;
        st.queue.clear();
        self.wake.notify_all();
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// A finished image on its way to the VQ thread.
struct ToDecode {
    index: usize,
    seed: u64,
    tokens: Vec<u32>,
    results: mpsc::UnboundedSender<ImageResult>,
}

/// The running engine.
pub struct Engine {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    opts: EngineOptions,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts the scheduler and VQ threads for `model` and `vq` (`embed_dim` its latent
    /// channels).
    pub fn start(
        model: &Gpt,
        vq: VqModel,
        embed_dim: usize,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Engine> {
        if opts.max_sequences == 0 || opts.kv_block_size == 0 || opts.vq_batch == 0 {
            return Err(ServeError::InvalidSetting(
                "--max-sequences, --kv-block-size and --vq-batch must be >= 1".into(),
            ));
        }
        let cfg = model.config().clone();
        let blocks = BatchDecoder::blocks_for_images(&cfg, opts.kv_block_size, opts.max_sequences);
        let dec = BatchDecoder::new(model, opts.kv_block_size, blocks)?;
        metrics
            .kv_blocks_total
            .store(blocks as u64, Ordering::Relaxed);
        metrics
            .kv_blocks_free
            .store(blocks as u64, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                stop: false,
                failed: None,
            }),
            wake: Condvar::new(),
        });
        let (vq_tx, vq_rx) = std_mpsc::channel::<ToDecode>();
        let g = cfg.grid_size();
        let vq_batch = opts.vq_batch;
        let vq_metrics = metrics.clone();
        let vq_shared = shared.clone();
        let vq_thread = std::thread::Builder::new()
            .name("vq-decode".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    vq_loop(vq, embed_dim, g, vq_batch, vq_rx, vq_metrics)
                });
                if let Err(p) = std::panic::catch_unwind(run) {
                    vq_shared.fail("VQ decoding", p);
                }
            })?;
        let s = shared.clone();
        let m = metrics.clone();
        let max_seq = opts.max_sequences;
        let sched = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || {
                let s2 = s.clone();
                let run =
                    std::panic::AssertUnwindSafe(|| scheduler_loop(dec, s, m, max_seq, vq_tx));
                if let Err(p) = std::panic::catch_unwind(run) {
                    s2.fail("scheduler", p);
                }
            })?;
        Ok(Engine {
            shared,
            metrics,
            opts,
            threads: vec![sched, vq_thread],
        })
    }

    /// Queues a request, or refuses it when `max_queue` requests are already waiting.
    pub fn submit(&self, sub: Submission) -> Result<()> {
        let mut st = self
            .shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(why) = &st.failed {
            return Err(ServeError::EngineFailed(why.clone()));
        }
        if st.stop {
            return Err(ServeError::ShuttingDown);
        }
        if st.queue.len() >= self.opts.max_queue {
            return Err(ServeError::QueueFull(st.queue.len()));
        }
        st.queue.push_back(Queued { sub, next: 0 });
        self.metrics
            .queue_depth
            .store(st.queue.len() as u64, Ordering::Relaxed);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Why the engine stopped working, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed
            .clone()
    }

    /// Wakes the scheduler (a client went away while its request waited).
    pub fn poke(&self) {
        self.shared.wake.notify_all();
    }

    /// Finishes what is queued and active, then stops the threads.
    pub fn shutdown(mut self) {
        {
            let mut st = self
                .shared
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.stop = true;
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct InFlight {
    index: usize,
    seed: u64,
    results: mpsc::UnboundedSender<ImageResult>,
    cancel: Arc<AtomicBool>,
}

fn scheduler_loop(
    mut dec: BatchDecoder,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    max_sequences: usize,
    vq: std_mpsc::Sender<ToDecode>,
) {
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_key = 0u64;
    loop {
        {
            let mut st = shared
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                // Clients that went away: out of the queue, out of the batch.
                let before = st.queue.len();
                st.queue.retain(|q| !q.sub.gone());
                let mut gone = (before - st.queue.len()) as u64;
                let dead: Vec<u64> = inflight
                    .iter()
                    .filter(|(_, f)| f.cancel.load(Ordering::Relaxed) || f.results.is_closed())
                    .map(|(&k, _)| k)
                    .collect();
                let mut reqs = std::collections::HashSet::new();
                for k in dead {
                    dec.cancel(k);
                    if let Some(f) = inflight.remove(&k) {
                        reqs.insert(Arc::as_ptr(&f.cancel) as usize);
                    }
                }
                gone += reqs.len() as u64;
                if gone > 0 {
                    metrics.cancelled.fetch_add(gone, Ordering::Relaxed);
                }
                // Admission at the token boundary.
                while let Some(front) = st.queue.front_mut() {
                    if dec.active_images() >= max_sequences {
                        break;
                    }
                    let job = front.sub.jobs[front.next].clone();
                    let seed = job.seed;
                    match dec.admit(next_key, job) {
                        Ok(true) => {
                            inflight.insert(
                                next_key,
                                InFlight {
                                    index: front.next,
                                    seed,
                                    results: front.sub.results.clone(),
                                    cancel: front.sub.cancel.clone(),
                                },
                            );
                            next_key += 1;
                            front.next += 1;
                            if front.next == front.sub.jobs.len() {
                                st.queue.pop_front();
                            }
                        }
                        Ok(false) => break,
                        Err(e) => {
                            let q = st.queue.pop_front().expect("front exists");
                            let _ = q.sub.results.send(Err(format!("generation refused: {e}")));
                        }
                    }
                }
                metrics
                    .queue_depth
                    .store(st.queue.len() as u64, Ordering::Relaxed);
                metrics
                    .active_images
                    .store(dec.active_images() as u64, Ordering::Relaxed);
                metrics
                    .active_rows
                    .store(dec.active_rows() as u64, Ordering::Relaxed);
                metrics
                    .kv_blocks_free
                    .store(dec.pool_blocks().0 as u64, Ordering::Relaxed);
                if dec.active_images() > 0 {
                    break;
                }
                if st.stop && st.queue.is_empty() {
                    return;
                }
                // Idle: wait for a submission (or a cancellation to look at).
                let (g, _) = shared
                    .wake
                    .wait_timeout(st, std::time::Duration::from_millis(200))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                st = g;
            }
        }
        let images = dec.active_images();
        match dec.step() {
            Ok(rep) => {
                metrics.step(images, rep.tokens);
                for (k, tokens) in rep.finished {
                    if let Some(f) = inflight.remove(&k) {
                        let _ = vq.send(ToDecode {
                            index: f.index,
                            seed: f.seed,
                            tokens,
                            results: f.results,
                        });
                    }
                }
            }
            Err(e) => {
                // A failed step fails every image in it; the decoder starts empty again.
                for (k, f) in inflight.drain() {
                    dec.cancel(k);
                    let _ = f.results.send(Err(format!("generation failed: {e}")));
                }
            }
        }
    }
}

/// Images `(B, 3, H, W)` in about [-1, 1] as PNGs, converted as `llamagen sample` converts them
/// (`clamp(127.5·x + 128, 0, 255)` truncated to uint8).
fn pngs(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, _, h, w) = images.dims4()?;
    let x = images
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let item = h * w * 3;
    (0..b)
        .map(|i| {
            let px: Vec<u8> = x[i * item..(i + 1) * item]
                .iter()
                .map(|&v| (127.5 * v + 128.0).clamp(0.0, 255.0) as u8)
                .collect();
            let img = image::RgbImage::from_raw(w as u32, h as u32, px)
                .ok_or_else(|| ServeError::External("image buffer of the wrong size".into()))?;
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Png)
                .map_err(|e| ServeError::External(format!("PNG encoding failed: {e}")))?;
            Ok(buf.into_inner())
        })
        .collect()
}

fn vq_loop(
    vq: VqModel,
    embed_dim: usize,
    g: usize,
    batch: usize,
    rx: std_mpsc::Receiver<ToDecode>,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = rx.recv() {
        let mut todo = vec![first];
        while todo.len() < batch {
            match rx.try_recv() {
                Ok(x) => todo.push(x),
                Err(_) => break,
            }
        }
        todo.retain(|t| !t.results.is_closed());
        if todo.is_empty() {
            continue;
        }
        let m = todo.len();
        let decoded = (|| -> Result<Vec<Vec<u8>>> {
            let flat: Vec<u32> = todo.iter().flat_map(|t| t.tokens.iter().copied()).collect();
            let codes = Tensor::from_vec(flat, (m, g * g), &Device::Cpu)?;
            let images = vq.decode_code(&codes, (m, embed_dim, g, g))?;
            pngs(&images)
        })();
        match decoded {
            Ok(pngs) => {
                for (t, png) in todo.into_iter().zip(pngs) {
                    metrics.images_total.fetch_add(1, Ordering::Relaxed);
                    let _ = t.results.send(Ok(ImageOut {
                        index: t.index,
                        seed: t.seed,
                        tokens: t.tokens,
                        png,
                    }));
                }
            }
            Err(e) => {
                for t in todo {
                    let _ = t.results.send(Err(format!("{e}")));
                }
            }
        }
    }
}

/// Caption features `(tokens, dim, values)` of one prompt, or why it was refused.
pub type PromptFeatures = std::result::Result<(usize, usize, Vec<f32>), String>;

/// Encodes prompts into caption features, one result per prompt; an `Err` for the whole call
/// fails every prompt of the batch. Implemented by the command with the T5 encoder.
pub trait PromptEncoder: Send + 'static {
    fn encode(&mut self, prompts: &[String]) -> std::result::Result<Vec<PromptFeatures>, String>;
}

/// Caption features left-padded to the model's `cls_token_num` tokens, and their mask.
pub type Caption = (Vec<f32>, Vec<bool>);

type PromptReply = oneshot::Sender<std::result::Result<Caption, String>>;

/// The T5 thread: prompts encoded one at a time, so a prompt's features never depend on the other
/// prompts in flight (T5 pads a batch to its longest prompt and then runs its masked path, which
/// changes the features in their last bits and so, after rounding, the sampled tokens).
pub struct PromptThread {
    tx: Option<std_mpsc::Sender<(String, PromptReply)>>,
    thread: Option<JoinHandle<()>>,
}

impl PromptThread {
    /// Starts the thread; captions are padded to `tokens` rows of width `dim`.
    pub fn start(mut enc: Box<dyn PromptEncoder>, tokens: usize, dim: usize) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel::<(String, PromptReply)>();
        let thread = std::thread::Builder::new()
            .name("t5-encode".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let todo = vec![first];
                    let prompts: Vec<String> = todo.iter().map(|(p, _)| p.clone()).collect();
                    match enc.encode(&prompts) {
                        Ok(feats) => {
                            for ((_, reply), f) in todo.into_iter().zip(feats) {
                                let _ = reply.send(f.and_then(|(l, d, v)| {
                                    if d != dim {
                                        return Err(format!(
                                            "caption features of width {d}, the model has caption_dim {dim}"
                                        ));
                                    }
                                    let cap = (l, v);
                                    llamagen_train::data::left_pad_captions(
                                        &[Some(&cap)],
                                        tokens,
                                        dim,
                                    )
                                    .map(|(f, m)| (f, m.iter().map(|&x| x != 0.0).collect()))
                                    .map_err(|e| e.to_string())
                                }));
                            }
                        }
                        Err(e) => {
                            for (_, reply) in todo {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            })?;
        Ok(PromptThread {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// The caption of `prompt` (awaits the batch it lands in).
    pub async fn encode(&self, prompt: String) -> Result<Caption> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(ServeError::ShuttingDown)?
            .send((prompt, reply))
            .map_err(|_| ServeError::Prompt("the T5 thread has stopped".into()))?;
        rx.await
            .map_err(|_| ServeError::Prompt("the T5 thread has stopped".into()))?
            .map_err(ServeError::Prompt)
    }
}

impl Drop for PromptThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
