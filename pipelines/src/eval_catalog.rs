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

/// The `size`-px renditions that `query` selects from the catalog at `root`, as one batch. The
/// result is streamed: only the chosen renditions of one record batch are held besides the
/// decoded pixels, each batch decoded in parallel straight into the batch's pixel buffer.
pub async fn query_images(root: &RootArgs, query: &str, size: u32) -> Result<Images> {
    use futures::StreamExt;
    let cat = root.open().await?;
    let ctx = sql::session_for(cat.storage().clone(), &root.dataset).await?;
    let context = || format!("catalog query {query:?}");
    let mut stream = ctx
        .sql_with_options(query, sql::read_only())
        .await
        .with_context(context)?
        .execute_stream()
        .await
        .with_context(context)?;
    let item = size as usize * size as usize * 3;
    let (mut n, mut pixels) = (0usize, Vec::new());
    while let Some(b) = stream.next().await {
        let b = b.with_context(context)?;
        // (label of the row for errors, encoded bytes)
        let mut encoded: Vec<(String, &[u8])> = Vec::with_capacity(b.num_rows());
        let holder = renditions(&b, size, n)?;
        for (label, data, i) in &holder.rows {
            encoded.push((label.clone(), data.value(*i)));
        }
        pixels.resize((n + encoded.len()) * item, 0);
        pixels[n * item..]
            .par_chunks_mut(item)
            .zip(&encoded)
            .try_for_each(|(dst, (label, bytes))| -> Result<()> {
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
                dst.copy_from_slice(img.as_raw());
                Ok(())
            })?;
        n += encoded.len();
    }
    if n == 0 {
        bail!("catalog query {query:?} selected no rows");
    }
    Ok(Images {
        n,
        height: size as usize,
        width: size as usize,
        pixels,
    })
}

/// The chosen rendition of each row of a record batch: (label, the rows' `data` array, index).
struct Renditions {
    rows: Vec<(String, BinaryArray, usize)>,
}

/// The `size` rendition of each row of `b` (row numbers from `first`, for errors).
fn renditions(b: &RecordBatch, size: u32, first: usize) -> Result<Renditions> {
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
    let mut rows = Vec::with_capacity(b.num_rows());
    for row in 0..b.num_rows() {
        let label = match &keys {
            Some(k) if k.is_valid(row) => format!("row with key {:?}", k.value(row)),
            _ => format!("row {}", first + row + 1),
        };
        if list.is_null(row) {
            bail!("{label}: no stored images");
        }
        let item = list.value(row);
        let s = item
            .as_struct_opt()
            .with_context(|| format!("`{}` is not a list of renditions", col::IMAGES))?;
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
        rows.push((label, data.clone(), i));
    }
    Ok(Renditions { rows })
}
