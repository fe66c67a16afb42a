//! Catalog SQL benchmark driver (run by `bench/catalog_sql.sh`, which also times DuckDB on the same
//! files and prints the ratio).
//!
//! `sql_bench generate <root> <rows> <shards>` writes a synthetic `samples` dataset of realistic
//! narrow columns (no images or embeddings) through the shard writer and commit protocol.
//! `sql_bench query <root> <repeats> <sql>…` opens a session (timed once) and runs each query
//! `repeats` times, printing one JSON line per query with every wall time in seconds.

use std::sync::Arc;
use std::time::Instant;

use llamagen_catalog::arrow::array::{
    ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};

/// xorshift64*: deterministic, fast, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const HOSTS: &[&str] = &[
    "https://i.pinimg.com/736x/",
    "https://images-na.ssl-images-amazon.com/images/I/",
    "http://t03.deviantart.net/th/pre/f/2008/",
    "https://cdn.shopify.com/s/files/1/0",
    "https://live.staticflickr.com/65535/",
    "http://www.example-shop.com/media/catalog/product/cache/",
];
const WORDS: &[&str] = &[
    "red",
    "vintage",
    "dress",
    "wooden",
    "table",
    "portrait",
    "of",
    "a",
    "cat",
    "sunset",
    "over",
    "the",
    "sea",
    "modern",
    "kitchen",
    "design",
    "with",
    "white",
    "cabinets",
    "logo",
    "mountain",
    "landscape",
    "painting",
    "oil",
    "on",
    "canvas",
    "blue",
    "car",
    "street",
    "photo",
];

fn batch(rng: &mut Rng, first: u64, n: usize) -> RecordBatch {
    let mut key = Vec::with_capacity(n);
    let mut url = Vec::with_capacity(n);
    let mut text = Vec::with_capacity(n);
    let (mut w, mut h, mut sim, mut pw, mut pu) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut status, mut kind, mut aest, mut clip, mut bytes, mut ow, mut oh) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let row = first + i as u64;
        key.push(format!("{:08x}-{row:010}", 0x2be0_45b7u32));
        url.push(format!(
            "{}{:016x}/{:08x}.jpg",
            HOSTS[(rng.next() % HOSTS.len() as u64) as usize],
            rng.next(),
            rng.next() as u32
        ));
        let words = 4 + rng.next() % 8;
        let t: Vec<&str> = (0..words)
            .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
            .collect();
        text.push(t.join(" "));
        let width = 200 + (rng.next() % 1800) as i64;
        let height = 200 + (rng.next() % 1800) as i64;
        w.push(Some(width));
        h.push(Some(height));
        sim.push(Some(0.28 + 0.1 * rng.unit()));
        pw.push(Some(rng.unit()));
        pu.push(Some(rng.unit() * 0.3));
        let r = rng.unit();
        let (st, k) = if r < 0.60 {
            ("ok", None)
        } else if r < 0.85 {
            (
                "failed",
                Some(["http_404", "timeout", "decode", "connect"][(rng.next() % 4) as usize]),
            )
        } else if r < 0.95 {
            ("dropped", None)
        } else {
            ("pending", None)
        };
        status.push(st);
        kind.push(k);
        let has = st == "ok" || st == "dropped";
        aest.push(has.then(|| (3.0 + 5.0 * rng.unit()) as f32));
        clip.push(has.then(|| (0.15 + 0.25 * rng.unit()) as f32));
        bytes.push(has.then(|| 20_000 + (rng.next() % 500_000) as i64));
        ow.push(has.then_some(width as i32));
        oh.push(has.then_some(height as i32));
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("key", Arc::new(StringArray::from(key))),
        (
            "source",
            Arc::new(StringArray::from(vec!["part-00000.parquet"; n])),
        ),
        (
            "source_row",
            Arc::new(Int64Array::from_iter_values(
                (0..n as i64).map(|i| first as i64 + i),
            )),
        ),
        ("url", Arc::new(StringArray::from(url))),
        ("text", Arc::new(StringArray::from(text))),
        ("width", Arc::new(Int64Array::from(w))),
        ("height", Arc::new(Int64Array::from(h))),
        ("similarity", Arc::new(Float64Array::from(sim))),
        ("pwatermark", Arc::new(Float64Array::from(pw))),
        ("punsafe", Arc::new(Float64Array::from(pu))),
        ("status", Arc::new(StringArray::from(status))),
        ("error_kind", Arc::new(StringArray::from(kind))),
        ("content_bytes", Arc::new(Int64Array::from(bytes))),
        ("orig_width", Arc::new(Int32Array::from(ow))),
        ("orig_height", Arc::new(Int32Array::from(oh))),
        ("score_aesthetic", Arc::new(Float32Array::from(aest))),
        ("score_clip_similarity", Arc::new(Float32Array::from(clip))),
    ];
    RecordBatch::try_from_iter(cols).expect("batch")
}

async fn generate(root: &str, rows: u64, shards: u64) -> anyhow::Result<()> {
    let cat = Catalog::open(root, &StorageOptions::default()).await?;
    let ds = cat.samples();
    let per_shard = rows.div_ceil(shards);
    let mut writer = ds.writer(ShardWriterOptions {
        stage: "bench".into(),
        max_rows: per_shard as usize,
        target_bytes: u64::MAX,
        ..Default::default()
    });
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(65_536) as usize;
        writer.write(&batch(&mut rng, done, n)).await?;
        done += n as u64;
    }
    let shards = writer.finish().await?;
    ds.commit(Transaction {
        operation: "bench".into(),
        add: shards,
        ..Default::default()
    })
    .await?;
    let m = ds.snapshot().await?;
    eprintln!(
        "generated {} rows in {} shards ({} bytes) in {:.1}s",
        m.rows(),
        m.shards.len(),
        m.bytes(),
        t.elapsed().as_secs_f64()
    );
    for s in &m.shards {
        println!("{}", ds.shard_path(s));
    }
    Ok(())
}

async fn query(root: &str, repeats: usize, queries: &[String]) -> anyhow::Result<()> {
    let cat = Catalog::open(root, &StorageOptions::default()).await?;
    let t = Instant::now();
    let ctx = cat.session().await?;
    let open = t.elapsed().as_secs_f64();
    for q in queries {
        let mut times = Vec::with_capacity(repeats);
        let mut rows = 0;
        for _ in 0..repeats {
            let t = Instant::now();
            let batches = ctx.sql(q).await?.collect().await?;
            times.push(t.elapsed().as_secs_f64());
            rows = batches.iter().map(|b| b.num_rows()).sum::<usize>();
            if std::env::var_os("SQL_BENCH_PRINT").is_some() {
                eprintln!(
                    "{}",
                    llamagen_catalog::arrow::util::pretty::pretty_format_batches(&batches)?
                );
            }
        }
        println!(
            "{}",
            serde_json::json!({"engine": "llamagen", "query": q, "open_s": open, "times_s": times, "result_rows": rows})
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("generate") if args.len() == 4 => {
            generate(&args[1], args[2].parse()?, args[3].parse()?).await
        }
        Some("query") if args.len() >= 4 => query(&args[1], args[2].parse()?, &args[3..]).await,
        _ => anyhow::bail!(
            "usage: sql_bench generate <root> <rows> <shards> | sql_bench query <root> <repeats> <sql>..."
        ),
    }
}
