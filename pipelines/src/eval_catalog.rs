//! Sample or reference batches for `llamagen eval` from a catalog query.
//!
//! The query runs read-only over the catalog's `samples` table (as `llamagen catalog sql`) and
//! must return the `images` column: each row's stored renditions (the `center_crop_arr` crops
//! ingest writes, one per target size, as ADM's reference batches crop ImageNet). The rendition
//! of `--image-size` px is decoded to RGB, in the query's row order; a row without it, or whose
//! bytes do not decode to that size, is an error naming the row's key (or its number).

use anyhow::{Context, Result, bail};
use llamagen_catalog::arrow::array::{
    Array, AsArray, BinaryArray, Int32Array, RecordBatch, StringArray,
};
use llamagen_catalog::arrow::compute::cast;
use llamagen_catalog::arrow::datatypes::DataType;
use llamagen_catalog::schema::col;
use llamagen_catalog::sql;
use llamagen_eval::batch::Images;
use rayon::prelude::*;

use crate::catalog_cmd::RootArgs;

/// The `size`-px renditions that `query` selects from the catalog at `root`, as one batch.
pub async fn query_images(root: &RootArgs, query: &str, size: u32) -> Result<Images> {
    let cat = root.open().await?;
    let ctx = sql::session_for(cat.storage().clone(), &root.dataset).await?;
    let (_, batches) = sql::query(&ctx, query)
        .await
        .with_context(|| format!("catalog query {query:?}"))?;
    // (label of the row for errors, encoded bytes)
    let mut encoded: Vec<(String, Vec<u8>)> = Vec::new();
    for b in &batches {
        collect(b, size, encoded.len(), &mut encoded)?;
    }
    if encoded.is_empty() {
        bail!("catalog query {query:?} selected no rows");
    }
    let side = size as usize;
    let decoded: Vec<Vec<u8>> = encoded
        .par_iter()
        .map(|(label, bytes)| {
            let img = image::load_from_memory(bytes)
                .with_context(|| format!("{label}: the {size} px image does not decode"))?
                .to_rgb8();
            if img.width() != size || img.height() != size {
                bail!(
                    "{label}: the {size} px image is {}x{} px",
                    img.width(),
                    img.height()
                );
            }
            Ok(img.into_raw())
        })
        .collect::<Result<_>>()?;
    let mut pixels = Vec::with_capacity(decoded.len() * side * side * 3);
    for d in &decoded {
        pixels.extend_from_slice(d);
    }
    Ok(Images {
        n: decoded.len(),
        height: side,
        width: side,
        pixels,
    })
}

/// The `size` renditions of the rows of `b` (row numbers from `first`) appended to `out`.
fn collect(
    b: &RecordBatch,
    size: u32,
    first: usize,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let Some(images) = b.column_by_name(col::IMAGES) else {
        bail!(
            "the query returns no `{}` column (columns: {:?}); select the stored images, e.g. \
             SELECT {} FROM samples WHERE status = 'ok'",
            col::IMAGES,
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            col::IMAGES
        );
    };
    // Keys may come as string views (DataFusion's default for strings): cast to plain strings.
    let keys = b
        .column_by_name(col::KEY)
        .and_then(|k| cast(k, &DataType::Utf8).ok())
        .and_then(|k| k.as_any().downcast_ref::<StringArray>().cloned());
    let list = images
        .as_list_opt::<i32>()
        .with_context(|| format!("`{}` is not a list of renditions", col::IMAGES))?;
    for row in 0..b.num_rows() {
        let label = match &keys {
            Some(k) if k.is_valid(row) => format!("row with key {:?}", k.value(row)),
            _ => format!("row {}", first + row + 1),
        };
        if list.is_null(row) {
            bail!("{label}: no stored images");
        }
        let item = list.value(row);
        let s = item.as_struct();
        let sizes = s
            .column_by_name("size")
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .context("renditions without a `size` field")?;
        let data = s
            .column_by_name("data")
            .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
            .context("renditions without a `data` field")?;
        let Some(i) = (0..s.len()).find(|&i| sizes.is_valid(i) && sizes.value(i) == size as i32)
        else {
            let have: Vec<i32> = (0..s.len()).map(|i| sizes.value(i)).collect();
            bail!("{label}: no {size} px image (stored sizes: {have:?}); pass --image-size");
        };
        out.push((label, data.value(i).to_vec()));
    }
    Ok(())
}
