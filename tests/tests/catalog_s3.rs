//! The catalog on a real S3-compatible server (moto) on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use llamagen_catalog::storage::aws_credential_types::Credentials;
use llamagen_catalog::storage::aws_credential_types::credential_fn::provide_credentials_fn;
use llamagen_catalog::storage::aws_credential_types::provider::SharedCredentialsProvider;
use llamagen_catalog::storage::aws_credential_types::provider::error::CredentialsError;
use llamagen_catalog::storage::{PutOutcome, S3Config, S3Storage, Storage};
use llamagen_catalog::{Catalog, ShardWriterOptions, Transaction, sql};
use llamagen_tests::{S3Server, run_llamagen, workspace};

async fn storage(server: &S3Server, bucket: &str, prefix: &str, small_parts: bool) -> S3Storage {
    let mut cfg = S3Config {
        bucket: bucket.into(),
        prefix: prefix.into(),
        ..server.storage_options().s3
    };
    if small_parts {
        cfg.multipart_threshold = 5 << 20;
        cfg.part_size = 5 << 20;
    }
    S3Storage::connect(cfg).await.unwrap()
}

#[tokio::test]
async fn s3_objects_conditional_puts_and_multipart() {
    let server = S3Server::start();
    server.create_bucket("objects").await;
    let s = storage(&server, "objects", "root/prefix", true).await;
    assert!(s.get("missing").await.is_err());
    s.put("a/one", Bytes::from_static(b"hello")).await.unwrap();
    s.put("a/two", Bytes::from_static(b"world!")).await.unwrap();
    assert_eq!(s.get("a/one").await.unwrap(), Bytes::from_static(b"hello"));
    assert_eq!(
        s.get_range("a/two", 1, 4).await.unwrap(),
        Bytes::from_static(b"orl")
    );
    let listed: Vec<(String, u64)> = s
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect();
    assert_eq!(listed, vec![("a/one".into(), 5), ("a/two".into(), 6)]);
    assert_eq!(
        s.put_if_absent("m/1", Bytes::from_static(b"x"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        s.put_if_absent("m/1", Bytes::from_static(b"y"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(s.get("m/1").await.unwrap(), Bytes::from_static(b"x"));
    // An object over 5 MiB goes up in parts (12 MiB in 5 MiB parts) and comes back byte for byte.
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &data).unwrap();
    let (_, path) = tmp.keep().unwrap();
    s.put_file("big/object.bin", &path).await.unwrap();
    assert!(!path.exists(), "put_file must consume the local file");
    let back = s.get("big/object.bin").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back.as_ref() == data.as_slice());
    assert!(
        s.incomplete_uploads().await.unwrap().is_empty(),
        "no multipart upload may linger"
    );
    s.delete("a/one").await.unwrap();
    s.delete("a/one").await.unwrap();
    assert_eq!(s.list("a/").await.unwrap().len(), 1);
    // The object is really under the prefix in the bucket.
    let raw = storage(&server, "objects", "", false).await;
    assert!(raw.get("root/prefix/m/1").await.is_ok());
}

#[tokio::test]
async fn s3_concurrent_commits_and_sql() {
    let server = S3Server::start();
    server.create_bucket("commits").await;
    let s: Arc<dyn Storage> = Arc::new(storage(&server, "commits", "cat", false).await);
    let ds = Catalog::from_storage(s.clone()).samples();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let ds = ds.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..3 {
                let keys: Vec<String> = (0..100).map(|r| format!("t{t}-{i}-{r}")).collect();
                let b = llamagen_catalog::arrow::array::RecordBatch::try_from_iter(vec![
                    (
                        "key",
                        Arc::new(llamagen_catalog::arrow::array::StringArray::from(keys))
                            as llamagen_catalog::arrow::array::ArrayRef,
                    ),
                    (
                        "status",
                        Arc::new(llamagen_catalog::arrow::array::StringArray::from(vec![
                            "ok";
                            100
                        ])),
                    ),
                ])
                .unwrap();
                let mut w = ds.writer(ShardWriterOptions::default());
                w.write(&b).await.unwrap();
                let add = w.finish().await.unwrap();
                ds.commit(Transaction {
                    operation: "test".into(),
                    add,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.version, 12);
    assert_eq!(snap.rows(), 1200);
    let ctx = sql::session(s.clone()).await.unwrap();
    let (_, b) = sql::query(
        &ctx,
        "SELECT count(DISTINCT key) AS n, count(*) AS m FROM samples",
    )
    .await
    .unwrap();
    let csv = batches_csv(&b);
    assert_eq!(csv.trim(), "n,m\n1200,1200");
}

/// Commits one shard of `rows` samples with keys `{tag}-{i}` to the `samples` dataset.
async fn commit_rows(ds: &llamagen_catalog::Dataset, tag: &str, rows: usize) {
    use llamagen_catalog::arrow::array::{ArrayRef, RecordBatch, StringArray};
    let keys: Vec<String> = (0..rows).map(|r| format!("{tag}-{r}")).collect();
    let b = RecordBatch::try_from_iter(vec![
        ("key", Arc::new(StringArray::from(keys)) as ArrayRef),
        ("status", Arc::new(StringArray::from(vec!["ok"; rows]))),
    ])
    .unwrap();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&b).await.unwrap();
    let add = w.finish().await.unwrap();
    ds.commit(Transaction {
        operation: "test".into(),
        add,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Requests the server has logged so far.
fn server_requests(server: &S3Server) -> usize {
    let log = std::env::temp_dir().join(format!("moto-{}.log", server.port));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" HTTP/1."))
        .count()
}

/// A credentials provider that counts its calls and hands out credentials valid for 1 s, or an
/// error once `fail` is set.
fn short_lived_credentials(fail: Arc<AtomicBool>) -> (SharedCredentialsProvider, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let p = provide_credentials_fn(move || {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = fail.load(Ordering::SeqCst);
        async move {
            if fail {
                return Err(CredentialsError::provider_error(
                    "the token service is down",
                ));
            }
            Ok(Credentials::new(
                format!("short-lived-{n}"),
                "secret",
                Some(format!("session-{n}")),
                Some(SystemTime::now() + Duration::from_secs(1)),
                "test",
            ))
        }
    });
    (SharedCredentialsProvider::new(p), calls)
}

/// Writes three shards to `bucket/cat` with the test's static credentials.
async fn three_shards(server: &S3Server, bucket: &str) {
    server.create_bucket(bucket).await;
    let s: Arc<dyn Storage> = Arc::new(storage(server, bucket, "cat", false).await);
    let ds = Catalog::from_storage(s).samples();
    for t in 0..3 {
        commit_rows(&ds, &format!("t{t}"), 100).await;
    }
}

async fn with_provider(
    server: &S3Server,
    bucket: &str,
    p: SharedCredentialsProvider,
) -> Result<S3Storage, llamagen_catalog::CatalogError> {
    S3Storage::connect(S3Config {
        bucket: bucket.into(),
        prefix: "cat".into(),
        credentials_provider: Some(p),
        ..server.storage_options().s3
    })
    .await
}

const DISTINCT_KEYS: &str = "SELECT count(DISTINCT key) AS n FROM samples";

/// DataFusion's object store resolves credentials again when they expire (they used to be
/// resolved once at connect time, so long queries failed once STS/IRSA credentials expired), and
/// not once per request.
#[tokio::test]
async fn s3_sql_refreshes_expiring_credentials() {
    let server = S3Server::start();
    three_shards(&server, "refresh").await;
    let (p, calls) = short_lived_credentials(Arc::new(AtomicBool::new(false)));
    let s: Arc<dyn Storage> = Arc::new(with_provider(&server, "refresh", p).await.unwrap());
    let ctx = sql::session(s).await.unwrap();
    let (calls0, requests0) = (calls.load(Ordering::SeqCst), server_requests(&server));
    let (_, b) = sql::query(&ctx, DISTINCT_KEYS).await.unwrap();
    assert_eq!(batches_csv(&b).trim(), "n\n300");
    // Past the expiry of every credential handed out so far; the session's store is the same.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls1 = calls.load(Ordering::SeqCst);
    let (_, b) = sql::query(&ctx, DISTINCT_KEYS).await.unwrap();
    assert_eq!(batches_csv(&b).trim(), "n\n300");
    let calls2 = calls.load(Ordering::SeqCst);
    let requests = server_requests(&server) - requests0;
    assert!(calls2 >= 2, "{calls2} calls");
    assert!(
        calls2 > calls1,
        "expired credentials were not resolved again"
    );
    assert!(
        calls2 - calls0 < requests,
        "{} credential resolutions for {requests} requests",
        calls2 - calls0
    );
}

/// Credentials that cannot be resolved fail the connect, or a later query, with an error naming
/// the bucket; no request goes out unsigned (the server would answer one).
#[tokio::test]
async fn s3_sql_fails_without_credentials_instead_of_going_unsigned() {
    let server = S3Server::start();
    three_shards(&server, "nocreds").await;
    let (p, _) = short_lived_credentials(Arc::new(AtomicBool::new(true)));
    let err = with_provider(&server, "nocreds", p)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("AWS credentials for s3://nocreds could not be resolved")
            && err.contains("the token service is down"),
        "{err}"
    );

    let fail = Arc::new(AtomicBool::new(false));
    let (p, _) = short_lived_credentials(fail.clone());
    let s: Arc<dyn Storage> = Arc::new(with_provider(&server, "nocreds", p).await.unwrap());
    let ctx = sql::session(s).await.unwrap();
    fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = server_requests(&server);
    let err = match sql::query(&ctx, DISTINCT_KEYS).await {
        Ok((_, b)) => panic!("query without credentials returned {}", batches_csv(&b)),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("AWS credentials for s3://nocreds could not be resolved")
            && err.contains("the token service is down"),
        "{err}"
    );
    assert_eq!(server_requests(&server), before, "a request went out");
}

fn batches_csv(b: &[llamagen_catalog::arrow::array::RecordBatch]) -> String {
    let mut out = Vec::new();
    {
        let mut w = llamagen_catalog::arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        for x in b {
            w.write(x).unwrap();
        }
    }
    String::from_utf8(out).unwrap()
}

/// The `llamagen` command against an s3:// root: import, SQL (through DataFusion's object store
/// with the same endpoint and credentials), stats and verify.
#[tokio::test]
async fn cli_on_an_s3_root() {
    let server = S3Server::start();
    server.create_bucket("cli").await;
    let env = server.env();
    let root = "s3://cli/catalogs/laion";
    let laion = workspace().join("data/laion_meta/img2dataset_test_10000.parquet");
    let (code, out, err) = run_llamagen(
        &["catalog", "import", laion.to_str().unwrap(), "--root", root],
        &env,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY status",
            "--root",
            root,
            "--format",
            "csv",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "status,n\nfailed,1\npending,9999\n");
    let (code, out, err) = run_llamagen(&["catalog", "stats", "--root", root], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 1, 1 shard(s), 10000 row(s)"), "{out}");
    let (code, out, err) = run_llamagen(&["catalog", "verify", "--root", root], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 ok, 0 bad"), "{out}");
    let (code, out, _) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT command, status, exit_code FROM runs",
            "--root",
            root,
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("\"status\":\"succeeded\"") && out.contains("\"exit_code\":0"),
        "{out}"
    );
}
