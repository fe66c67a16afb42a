//! S3 and S3-compatible servers through aws-sdk-s3.
//!
//! - Credentials: the SDK client and DataFusion's object store (SQL, Delta logs, URL lists) take
//!   their credentials from one provider chain: [`S3Config::credentials_provider`] if set, else
//!   [`S3Config::static_credentials`], else the standard AWS chain (environment, profile files,
//!   web identity/IRSA, container and instance metadata). Both go through one cache that resolves
//!   again before the credentials expire (see [`RefreshingCredentials`]), so long queries outlive
//!   STS, IRSA and instance credentials. No request is ever sent unsigned: when credentials cannot
//!   be resolved, [`S3Storage::connect`] fails with [`CatalogError::S3Credentials`], and a later
//!   request fails with an error naming the bucket.
//! - Endpoint and region come from [`S3Config`] or the standard `AWS_ENDPOINT_URL(_S3)` /
//!   `AWS_REGION` variables.
//! - Every request is retried by the SDK's standard retry mode (exponential backoff with jitter on
//!   throttling, 5xx and connection errors), up to [`S3Config::max_attempts`].
//! - Objects over [`S3Config::multipart_threshold`] are uploaded in parts; a failed upload is
//!   aborted so no part lingers, and the object appears only when the upload completes.
//! - `put_if_absent` is a conditional put with `If-None-Match: *` (HTTP 412 means the name is
//!   taken; 409, a concurrent conditional write in flight, is retried).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::{CredentialProvider, ObjectStore};
use url::Url;

use super::{ObjectInfo, PutOutcome, Storage};
use crate::error::{CatalogError, Result};

/// S3 connection settings. Unset fields fall back to the standard AWS environment.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix under which the root lives (no leading or trailing `/`).
    pub prefix: String,
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:9000`). Default: AWS, or
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's region, then `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`). Default: on when an endpoint is set, since
    /// S3-compatible servers usually need it; `LLAMAGEN_S3_PATH_STYLE=0|1` overrides.
    pub path_style: Option<bool>,
    /// Static credentials (access key id, secret key), e.g. for an on-premise server. Default:
    /// the standard AWS chain.
    pub static_credentials: Option<(String, String)>,
    /// A credentials provider that replaces the standard AWS chain and `static_credentials`
    /// (e.g. an application's own STS session). Its credentials are cached and resolved again
    /// before they expire, like the chain's.
    pub credentials_provider: Option<SharedCredentialsProvider>,
    /// Attempts per request, the first included (default 8).
    pub max_attempts: u32,
    /// Objects at least this large are uploaded in parts (default 16 MiB).
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (default 8 MiB; S3's minimum is 5 MiB).
    pub part_size: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: None,
            static_credentials: None,
            credentials_provider: None,
            max_attempts: 8,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
        }
    }
}

impl S3Config {
    fn resolved_endpoint(&self) -> Option<String> {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|s| !s.is_empty())
    }

    fn resolved_path_style(&self) -> bool {
        if let Some(p) = self.path_style {
            return p;
        }
        match std::env::var("LLAMAGEN_S3_PATH_STYLE").ok().as_deref() {
            Some("1") | Some("true") => true,
            Some("0") | Some("false") => false,
            _ => self.resolved_endpoint().is_some(),
        }
    }
}

/// Storage in an S3 bucket under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    cfg: S3Config,
    /// The credentials of both the SDK client and DataFusion's object store.
    credentials: RefreshingCredentials,
    endpoint: Option<String>,
    region: String,
}

impl S3Storage {
    /// Builds a client from `cfg` and the standard AWS configuration chain, and resolves
    /// credentials once: none is an error ([`CatalogError::S3Credentials`]), not anonymous access.
    pub async fn connect(cfg: S3Config) -> Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some(region) = cfg.region.clone() {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(provider) = cfg.credentials_provider.clone() {
            loader = loader.credentials_provider(provider);
        } else if let Some((id, secret)) = &cfg.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "llamagen-static",
            ));
        }
        let endpoint = cfg.resolved_endpoint();
        if let Some(ep) = &endpoint {
            loader = loader.endpoint_url(ep);
        }
        let sdk = loader.load().await;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".to_string());
        let chain = sdk
            .credentials_provider()
            .ok_or_else(|| CatalogError::S3Credentials {
                bucket: cfg.bucket.clone(),
                message: "no credentials provider is configured".into(),
            })?;
        let credentials = RefreshingCredentials::new(&cfg.bucket, chain);
        // Fail early and clearly rather than at the first request.
        credentials
            .credentials()
            .await
            .map_err(|e| CatalogError::S3Credentials {
                bucket: cfg.bucket.clone(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        let s3cfg = aws_sdk_s3::config::Builder::from(&sdk)
            .region(aws_config::Region::new(region.clone()))
            .force_path_style(cfg.resolved_path_style())
            .credentials_provider(credentials.clone())
            .build();
        Ok(S3Storage {
            client: Client::from_conf(s3cfg),
            cfg,
            credentials,
            endpoint,
            region,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.cfg.bucket
    }

    fn key(&self, path: &str) -> String {
        super::join(&self.cfg.prefix, path)
    }

    fn err<E: std::error::Error + 'static>(
        &self,
        op: &'static str,
        key: &str,
        e: E,
    ) -> CatalogError {
        CatalogError::S3 {
            op,
            bucket: self.cfg.bucket.clone(),
            key: key.to_string(),
            message: DisplayErrorContext(&e).to_string(),
        }
    }

    /// Creates the bucket if it does not exist (tests and first runs against fresh servers).
    pub async fn ensure_bucket(&self) -> Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.cfg.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.cfg.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou") | Some("BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("create_bucket", "", e)),
        }
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.err("put_object", key, e))?;
        Ok(())
    }

    /// Multipart upload of a local file; aborted (parts deleted) on any failure.
    async fn put_multipart(&self, key: &str, file: &Path) -> Result<()> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err("create_multipart_upload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &upload_id, file).await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(&self, key: &str, upload_id: &str, file: &Path) -> Result<()> {
        use std::io::Read;
        let mut f = std::fs::File::open(file).map_err(|e| CatalogError::io(file, e))?;
        let part_size = self.cfg.part_size.max(5 << 20) as usize;
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut buf = Vec::with_capacity(part_size);
            (&mut f)
                .take(part_size as u64)
                .read_to_end(&mut buf)
                .map_err(|e| CatalogError::io(file, e))?;
            if buf.is_empty() && number > 1 {
                break;
            }
            let last = buf.len() < part_size;
            let out = self
                .client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| self.err("upload_part", key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
            if last {
                break;
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err("complete_multipart_upload", key, e))?;
        Ok(())
    }

    /// Multipart uploads under this root that were started and never completed or aborted
    /// (a crashed writer's), as (key, upload id, initiated).
    pub async fn incomplete_uploads(&self) -> Result<Vec<(String, String, Option<DateTime<Utc>>)>> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.cfg.bucket)
            .prefix(&self.cfg.prefix)
            .send()
            .await
            .map_err(|e| self.err("list_multipart_uploads", &self.cfg.prefix, e))?;
        Ok(out
            .uploads()
            .iter()
            .map(|u| {
                (
                    u.key().unwrap_or_default().to_string(),
                    u.upload_id().unwrap_or_default().to_string(),
                    u.initiated()
                        .and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
                )
            })
            .collect())
    }

    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.err("abort_multipart_upload", key, e))?;
        Ok(())
    }
}

/// Credentials are resolved again once they are this close to their expiry (or half their
/// lifetime, if that is shorter).
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// When credentials resolved at `fetched` and expiring at `expiry` are to be resolved again:
/// [`REFRESH_MARGIN`] before expiry, or halfway through a shorter lifetime.
fn refresh_at(fetched: SystemTime, expiry: SystemTime) -> SystemTime {
    let lifetime = expiry.duration_since(fetched).unwrap_or_default();
    expiry - REFRESH_MARGIN.min(lifetime / 2)
}

/// Resolved credentials, in the SDK's and the object store's form.
struct Cached {
    sdk: Credentials,
    object_store: Arc<AwsCredential>,
    /// None: the credentials do not expire.
    refresh_at: Option<SystemTime>,
    /// When resolving again last failed (the cached credentials still being valid): no new
    /// attempt before [`RETRY_AFTER`], so an outage of the provider does not serialise every
    /// request behind its timeouts.
    failed_at: Option<SystemTime>,
}

/// Wait between attempts to resolve again after a failure, while cached credentials are valid.
const RETRY_AFTER: Duration = Duration::from_secs(15);

impl Cached {
    fn fresh(&self, now: SystemTime) -> bool {
        let backing_off = self.failed_at.is_some_and(|f| {
            now.duration_since(f).unwrap_or_default() < RETRY_AFTER && self.valid(now)
        });
        backing_off || self.refresh_at.is_none_or(|t| now < t)
    }

    fn valid(&self, now: SystemTime) -> bool {
        self.sdk.expiry().is_none_or(|t| now < t)
    }
}

/// A bucket's credentials: a provider chain's, cached, and resolved again before they expire
/// (credentials without an expiry are kept). One resolution runs at a time; concurrent callers
/// wait for it. If resolving fails while the cached credentials are still valid, those are used
/// (and resolving is tried again after [`RETRY_AFTER`]). Serves both the SDK client
/// ([`ProvideCredentials`]) and DataFusion's object store ([`CredentialProvider`]).
#[derive(Clone)]
pub struct RefreshingCredentials(Arc<RefreshingInner>);

struct RefreshingInner {
    bucket: String,
    provider: SharedCredentialsProvider,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for RefreshingCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshingCredentials")
            .field("bucket", &self.0.bucket)
            .field("provider", &self.0.provider)
            .finish_non_exhaustive()
    }
}

impl RefreshingCredentials {
    pub fn new(bucket: &str, provider: SharedCredentialsProvider) -> Self {
        RefreshingCredentials(Arc::new(RefreshingInner {
            bucket: bucket.to_string(),
            provider,
            cached: tokio::sync::Mutex::new(None),
        }))
    }

    async fn cached(&self) -> Result<(Credentials, Arc<AwsCredential>), CredentialsError> {
        let mut cached = self.0.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.fresh(SystemTime::now())) {
            return Ok((c.sdk.clone(), c.object_store.clone()));
        }
        match self.0.provider.provide_credentials().await {
            Ok(sdk) => {
                let object_store = Arc::new(AwsCredential {
                    key_id: sdk.access_key_id().to_string(),
                    secret_key: sdk.secret_access_key().to_string(),
                    token: sdk.session_token().map(str::to_string),
                });
                let refresh_at = sdk.expiry().map(|t| refresh_at(SystemTime::now(), t));
                let c = cached.insert(Cached {
                    sdk,
                    object_store,
                    refresh_at,
                    failed_at: None,
                });
                Ok((c.sdk.clone(), c.object_store.clone()))
            }
            Err(e) => match cached.as_mut().filter(|c| c.valid(SystemTime::now())) {
                Some(c) => {
                    c.failed_at = Some(SystemTime::now());
                    Ok((c.sdk.clone(), c.object_store.clone()))
                }
                None => Err(e),
            },
        }
    }

    /// The current credentials, resolved again if they are near their expiry.
    pub async fn credentials(&self) -> Result<Credentials, CredentialsError> {
        Ok(self.cached().await?.0)
    }
}

impl ProvideCredentials for RefreshingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.credentials())
    }
}

#[async_trait]
impl CredentialProvider for RefreshingCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        match self.cached().await {
            Ok((_, c)) => Ok(c),
            Err(e) => Err(object_store::Error::Generic {
                store: "S3",
                source: format!(
                    "AWS credentials for s3://{} could not be resolved: {}",
                    self.0.bucket,
                    DisplayErrorContext(&e)
                )
                .into(),
            }),
        }
    }
}

fn http_status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

#[async_trait]
impl Storage for S3Storage {
    fn root(&self) -> String {
        if self.cfg.prefix.is_empty() {
            format!("s3://{}", self.cfg.bucket)
        } else {
            format!("s3://{}/{}", self.cfg.bucket, self.cfg.prefix)
        }
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let key = self.key(path);
        let out = match self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if http_status(&e) == Some(404) || e.code() == Some("NoSuchKey") => {
                return Err(CatalogError::NotFound {
                    path: format!("s3://{}/{key}", self.cfg.bucket),
                });
            }
            Err(e) => return Err(self.err("get_object", &key, e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.err("get_object", &key, e))?;
        Ok(body.into_bytes())
    }

    async fn get_range(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        let key = self.key(path);
        if end <= start {
            return Ok(Bytes::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .range(format!("bytes={}-{}", start, end - 1))
            .send()
            .await
            .map_err(|e| {
                if http_status(&e) == Some(404) {
                    CatalogError::NotFound {
                        path: format!("s3://{}/{key}", self.cfg.bucket),
                    }
                } else {
                    self.err("get_object", &key, e)
                }
            })?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.err("get_object", &key, e))?;
        Ok(body.into_bytes())
    }

    async fn put(&self, path: &str, data: Bytes) -> Result<()> {
        self.put_bytes(&self.key(path), data).await
    }

    async fn put_file(&self, path: &str, file: &Path) -> Result<()> {
        let key = self.key(path);
        let len = std::fs::metadata(file)
            .map_err(|e| CatalogError::io(file, e))?
            .len();
        if len >= self.cfg.multipart_threshold {
            self.put_multipart(&key, file).await?;
        } else {
            let data = std::fs::read(file).map_err(|e| CatalogError::io(file, e))?;
            self.put_bytes(&key, Bytes::from(data)).await?;
        }
        std::fs::remove_file(file).map_err(|e| CatalogError::io(file, e))
    }

    async fn put_if_absent(&self, path: &str, data: Bytes) -> Result<PutOutcome> {
        let key = self.key(path);
        let mut conflicts = 0;
        loop {
            let r = self
                .client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from(data.clone()))
                .send()
                .await;
            match r {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(e)
                    if http_status(&e) == Some(412) || e.code() == Some("PreconditionFailed") =>
                {
                    return Ok(PutOutcome::AlreadyExists);
                }
                Err(e) if (http_status(&e) == Some(409)) && conflicts < 10 => {
                    conflicts += 1;
                    tokio::time::sleep(Duration::from_millis(50 << conflicts.min(5))).await;
                }
                Err(e) => return Err(self.err("put_object(If-None-Match)", &key, e)),
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = self.key(prefix);
        let strip = if self.cfg.prefix.is_empty() {
            0
        } else {
            self.cfg.prefix.len() + 1
        };
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list_objects_v2", &full, e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                if k.len() < strip {
                    continue;
                }
                let last_modified = o
                    .last_modified()
                    .and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_else(Utc::now);
                out.push(ObjectInfo {
                    path: k[strip..].to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let key = self.key(path);
        self.client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.err("delete_object", &key, e))?;
        Ok(())
    }

    async fn abort_stale_uploads(
        &self,
        cutoff: DateTime<Utc>,
        dry_run: bool,
    ) -> Result<Vec<String>> {
        let mut aborted = Vec::new();
        for (key, id, initiated) in self.incomplete_uploads().await? {
            if initiated.is_some_and(|t| t < cutoff) {
                if !dry_run {
                    self.abort_upload(&key, &id).await?;
                }
                aborted.push(key);
            }
        }
        Ok(aborted)
    }

    fn object_store(&self) -> Result<(Url, Arc<dyn ObjectStore>)> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.cfg.bucket)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(!self.cfg.resolved_path_style());
        if let Some(ep) = &self.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        // Always signed, with the SDK's credentials (never `with_skip_signature`).
        b = b.with_credentials(Arc::new(self.credentials.clone()));
        let store = b.build()?;
        let url = if self.cfg.prefix.is_empty() {
            format!("s3://{}/", self.cfg.bucket)
        } else {
            format!("s3://{}/{}/", self.cfg.bucket, self.cfg.prefix)
        };
        let url = Url::parse(&url).map_err(|e| CatalogError::InvalidUri {
            uri: url.clone(),
            reason: e.to_string(),
        })?;
        Ok((url, Arc::new(store)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::credential_fn::provide_credentials_fn;

    use super::*;

    /// A provider that counts its calls; the `n`th call (from 1) answers `answer(n)`.
    fn counting(
        answer: impl Fn(usize) -> Result<Credentials, CredentialsError> + Send + Sync + 'static,
    ) -> (SharedCredentialsProvider, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let answer = Arc::new(answer);
        let p = provide_credentials_fn(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = answer.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer(n)
            }
        });
        (SharedCredentialsProvider::new(p), calls)
    }

    fn creds(n: usize, valid_for: Option<Duration>) -> Credentials {
        Credentials::new(
            format!("key-{n}"),
            "secret",
            Some(format!("token-{n}")),
            valid_for.map(|d| SystemTime::now() + d),
            "test",
        )
    }

    #[test]
    fn refresh_margin_is_five_minutes_or_half_a_short_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = Duration::from_secs(3600);
        assert_eq!(refresh_at(t0, t0 + h), t0 + h - REFRESH_MARGIN);
        assert_eq!(
            refresh_at(t0, t0 + Duration::from_secs(120)),
            t0 + Duration::from_secs(60)
        );
        assert_eq!(
            refresh_at(t0, t0 + Duration::from_secs(1)),
            t0 + Duration::from_millis(500)
        );
        // Already expired when resolved: stale at once.
        assert_eq!(refresh_at(t0, t0 - h), t0 - h);
    }

    #[tokio::test]
    async fn credentials_without_expiry_are_resolved_once_by_concurrent_callers() {
        let (p, calls) = counting(|n| Ok(creds(n, None)));
        let rc = RefreshingCredentials::new("b", p);
        let got = futures::future::join_all((0..16).map(|_| rc.get_credential())).await;
        for c in got {
            assert_eq!(c.unwrap().key_id, "key-1");
        }
        assert_eq!(rc.credentials().await.unwrap().access_key_id(), "key-1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn expiring_credentials_are_resolved_again_within_the_margin() {
        let (p, calls) = counting(|n| Ok(creds(n, Some(Duration::from_secs(2)))));
        let rc = RefreshingCredentials::new("b", p);
        let c = rc.get_credential().await.unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.token.as_deref()),
            ("key-1", Some("token-1"))
        );
        assert_eq!(rc.get_credential().await.unwrap().key_id, "key-1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Half the 2 s lifetime has passed: resolved again.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(rc.get_credential().await.unwrap().key_id, "key-2");
        assert_eq!(rc.credentials().await.unwrap().access_key_id(), "key-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_valid_credentials_and_then_fails_naming_the_bucket() {
        let (p, calls) = counting(|n| match n {
            1 => Ok(creds(n, Some(Duration::from_secs(2)))),
            _ => Err(CredentialsError::provider_error("token service down")),
        });
        let rc = RefreshingCredentials::new("my-bucket", p);
        assert_eq!(rc.get_credential().await.unwrap().key_id, "key-1");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Within the margin, the refresh fails, the old credentials are still valid.
        assert_eq!(rc.get_credential().await.unwrap().key_id, "key-1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Within RETRY_AFTER of that failure, no new attempt while the credentials are valid.
        assert_eq!(rc.get_credential().await.unwrap().key_id, "key-1");
        assert_eq!(rc.credentials().await.unwrap().access_key_id(), "key-1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        match rc.get_credential().await {
            Err(object_store::Error::Generic { store, source }) => {
                assert_eq!(store, "S3");
                let msg = source.to_string();
                assert!(
                    msg.contains("AWS credentials for s3://my-bucket could not be resolved")
                        && msg.contains("token service down"),
                    "{msg}"
                );
            }
            other => panic!("expected a credentials error, got {other:?}"),
        }
        assert!(rc.credentials().await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connect_fails_without_credentials() {
        let (p, _) = counting(|_| Err(CredentialsError::not_loaded("nothing configured")));
        let err = S3Storage::connect(S3Config {
            bucket: "nocreds".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: Some("us-east-1".into()),
            credentials_provider: Some(p),
            ..Default::default()
        })
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CatalogError::S3Credentials { .. }), "{err:?}");
        assert!(
            msg.contains("s3://nocreds") && msg.contains("nothing configured"),
            "{msg}"
        );
    }
}
