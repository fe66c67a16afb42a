//! The `vq` catalog stage: image shards → VQ code grids (`vq_codes`), a copy-on-write rewrite
//! through [`llamagen_catalog::stage::map_shards`].
//!
//! Invariants:
//! - Only rows whose `status` is `ok` or `pending` are encoded; other rows keep every column.
//! - Each [`CodeView`] is encoded from the stored image rendition whose `size` equals the view's
//!   crop size (`image_size` for a centre crop, `int(image_size·crop_range)` for a ten-crop set).
//!   Ingest stores `center_crop_arr(original, size)`, and `center_crop_arr` of that at the same
//!   size is the identity, so the codes are those of the official extraction on the original
//!   image. A row without that rendition is never encoded from another size (that would change
//!   the pixels): it becomes `failed` with `error_kind` `missing_image_size`, or `dropped` when
//!   ingest recorded it as `below_image_size_<size>` (too small for that size: LlamaGen's t2i
//!   dataset makes it an invalid sample, `valid = 0`). A rendition that does
//!   not decode makes the row `failed` with `image_decode_error`; the shard goes on.
//! - `vq_codes` holds, per row, the centre grids first (in the configured order of sizes), then
//!   each ten-crop set in TenCrop order (see [`llamagen_catalog::schema::vq_code_fields`]).
//! - The stage name carries a digest of the weights and the views, so changing either re-encodes
//!   every shard on the next run; each encoded row gets a `provenance` entry.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use image::RgbImage;
use llamagen_catalog::StageCounters;
use llamagen_catalog::schema::{col, vq_code_fields};
use sha2::{Digest, Sha256};

use crate::augment;
use crate::codes::{CodeGrid, encode_images};
use crate::error::EncodeError;
use crate::text_stage::{ProvenanceEntry, append_provenance};
use crate::vq::VqModel;

type Result<T> = std::result::Result<T, EncodeError>;

/// Prefix of the stage name recorded in the table log (`vq-<digest>`).
pub const VQ_STAGE_PREFIX: &str = "vq-";

/// One set of code grids per image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CodeView {
    /// `center_crop_arr(img, image_size)`: the text-to-image codes (256 and 512 px stages).
    Center { image_size: u32 },
    /// The class-conditional `--ten-crop` set: TenCrop(image_size) of
    /// `center_crop_arr(img, int(image_size·crop_range))` (official crop_range 1.1; 1.05 also
    /// used), in torchvision order (four corners, centre, then the same flipped).
    TenCrop { image_size: u32, crop_range: f64 },
}

impl CodeView {
    /// Side of the stored rendition this view is computed from.
    pub fn source_size(&self) -> u32 {
        match *self {
            CodeView::Center { image_size } => image_size,
            CodeView::TenCrop {
                image_size,
                crop_range,
            } => augment::crop_size(image_size, crop_range),
        }
    }

    fn image_size(&self) -> u32 {
        match *self {
            CodeView::Center { image_size } | CodeView::TenCrop { image_size, .. } => image_size,
        }
    }

    fn describe(&self) -> String {
        match self {
            CodeView::Center { image_size } => format!("center{image_size}"),
            CodeView::TenCrop {
                image_size,
                crop_range,
            } => format!("tencrop{image_size}x{crop_range}"),
        }
    }
}

/// `center:SIZE` or `tencrop:SIZE:CROP_RANGE`, as the command line writes a view.
impl std::str::FromStr for CodeView {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("view {s:?}: use center:SIZE or tencrop:SIZE:CROP_RANGE");
        let parts: Vec<&str> = s.split(':').collect();
        Ok(match parts.as_slice() {
            ["center", size] => CodeView::Center {
                image_size: size.parse().map_err(|_| bad())?,
            },
            ["tencrop", size, range] => CodeView::TenCrop {
                image_size: size.parse().map_err(|_| bad())?,
                crop_range: range.parse().map_err(|_| bad())?,
            },
            _ => return Err(bad()),
        })
    }
}

/// Settings of the `vq` stage.
#[derive(Debug, Clone)]
pub struct VqStageConfig {
    /// The code sets to compute. Default: one 256 px centre crop.
    pub views: Vec<CodeView>,
    /// Images per forward pass. Default [`crate::codes::DEFAULT_BATCH_SIZE`].
    pub batch_size: usize,
    /// Name of the weights (file name or model id), for provenance.
    pub model_id: String,
    /// Hex SHA-256 of the weight file, for provenance and the stage name.
    pub weights_sha256: String,
}

impl VqStageConfig {
    /// The stage name: `vq-` and 16 hex digits of SHA-256(weights digest, views).
    pub fn stage_name(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.weights_sha256.as_bytes());
        for v in &self.views {
            h.update(b"|");
            h.update(v.describe().as_bytes());
        }
        format!("{VQ_STAGE_PREFIX}{}", &hex::encode(h.finalize())[..16])
    }

    fn check(&self, model: &VqModel) -> Result<()> {
        if self.views.is_empty() {
            return Err(EncodeError::InvalidConfig("vq stage: no code views".into()));
        }
        if self.batch_size == 0 {
            return Err(EncodeError::InvalidConfig(
                "vq stage: batch_size must be positive".into(),
            ));
        }
        for v in &self.views {
            let s = v.image_size() as usize;
            model.check_image_size(s, s)?;
            if let CodeView::TenCrop { crop_range, .. } = v
                && !(*crop_range >= 1.0 && crop_range.is_finite())
            {
                return Err(EncodeError::InvalidConfig(format!(
                    "vq stage: crop_range {crop_range} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

fn bad(msg: String) -> EncodeError {
    EncodeError::InvalidInput(msg)
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| bad(format!("batch has no string column {name:?}")))
}

/// The stored rendition of side `size` of row `i`, decoded to RGB; `Ok(None)` if there is none.
fn rendition(
    images: Option<&arrow::array::ListArray>,
    i: usize,
    size: u32,
) -> std::result::Result<Option<RgbImage>, String> {
    let Some(list) = images.filter(|l| !l.is_null(i)) else {
        return Ok(None);
    };
    let v = list.value(i);
    let s = v.as_struct();
    let sizes = s
        .column_by_name("size")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>())
        .ok_or("images has no int32 size field")?;
    let data = s
        .column_by_name("data")
        .and_then(|c| c.as_binary_opt::<i32>())
        .ok_or("images has no binary data field")?;
    for j in 0..s.len() {
        if !sizes.is_null(j) && sizes.value(j) == size as i32 && !data.is_null(j) {
            let img = image::load_from_memory(data.value(j))
                .map_err(|e| format!("stored {size} px image does not decode: {e}"))?;
            let rgb = img.to_rgb8();
            // Already the centre crop of this size; center_crop_arr is then the identity. Other
            // shapes (written by other tools) get the official crop here.
            if rgb.width() == size && rgb.height() == size {
                return Ok(Some(rgb));
            }
            return augment::center_crop_arr(&rgb, size)
                .map(Some)
                .map_err(|e| e.to_string());
        }
    }
    Ok(None)
}

/// Sets `vq_codes` for the processable rows of `batch` (see the module invariants).
pub fn vq_batch(
    batch: &RecordBatch,
    model: &VqModel,
    cfg: &VqStageConfig,
    counters: &mut StageCounters,
) -> Result<RecordBatch> {
    cfg.check(model)?;
    let n = batch.num_rows();
    let status = strings(batch, col::STATUS)?;
    let error_kind = strings(batch, col::ERROR_KIND)?;
    let error = strings(batch, col::ERROR)?;
    let images = batch
        .column_by_name(col::IMAGES)
        .and_then(|c| c.as_list_opt::<i32>());
    let old_codes = batch
        .column_by_name(col::VQ_CODES)
        .and_then(|c| c.as_list_opt::<i32>());
    let reasons = batch
        .column_by_name(col::REJECT_REASONS)
        .and_then(|c| c.as_list_opt::<i32>());
    // Whether ingest recorded row `i` as too small for `size` (LlamaGen's invalid sample).
    let below = |i: usize, size: u32| -> bool {
        let want = format!("below_image_size_{size}");
        reasons.filter(|r| !r.is_null(i)).is_some_and(|r| {
            let v = r.value(i);
            let v = v.as_string::<i32>();
            (0..v.len()).any(|j| !v.is_null(j) && v.value(j) == want)
        })
    };

    // Per row: the images of every view, or the reason it cannot be encoded.
    let mut st: Vec<String> = (0..n).map(|i| status.value(i).to_string()).collect();
    let mut ek: Vec<Option<String>> = (0..n)
        .map(|i| (!error_kind.is_null(i)).then(|| error_kind.value(i).to_string()))
        .collect();
    let mut er: Vec<Option<String>> = (0..n)
        .map(|i| (!error.is_null(i)).then(|| error.value(i).to_string()))
        .collect();
    let mut encode_row = vec![false; n];
    // view -> (row, images of that view for the row)
    let mut inputs: Vec<Vec<(usize, Vec<RgbImage>)>> = vec![Vec::new(); cfg.views.len()];
    'rows: for i in 0..n {
        if !(st[i] == "ok" || st[i] == "pending") {
            continue;
        }
        counters.received += 1;
        counters.written += 1;
        let mut per_view = Vec::with_capacity(cfg.views.len());
        for v in &cfg.views {
            let size = v.source_size();
            let fail = |kind: &str,
                        msg: String,
                        st: &mut Vec<String>,
                        ek: &mut Vec<_>,
                        er: &mut Vec<_>| {
                st[i] = "failed".into();
                ek[i] = Some(kind.to_string());
                er[i] = Some(msg);
            };
            match rendition(images, i, size) {
                Ok(Some(img)) => {
                    let imgs = match v {
                        CodeView::Center { image_size } => {
                            vec![augment::center_crop_arr(&img, *image_size)?]
                        }
                        CodeView::TenCrop {
                            image_size,
                            crop_range,
                        } => augment::ten_crop_arr(&img, *image_size, *crop_range)?,
                    };
                    per_view.push(imgs);
                }
                Ok(None) if below(i, size) => {
                    // Too small for this size: an invalid sample in LlamaGen's t2i dataset.
                    counters.drop_reason(&format!("below_image_size_{size}"));
                    st[i] = "dropped".into();
                    continue 'rows;
                }
                Ok(None) => {
                    counters.error_kind("missing_image_size");
                    fail(
                        "missing_image_size",
                        format!(
                            "vq {}: no stored {size} px image (ingest with image size {size})",
                            v.describe()
                        ),
                        &mut st,
                        &mut ek,
                        &mut er,
                    );
                    continue 'rows;
                }
                Err(msg) => {
                    counters.error_kind("image_decode_error");
                    fail(
                        "image_decode_error",
                        format!("vq: {msg}"),
                        &mut st,
                        &mut ek,
                        &mut er,
                    );
                    continue 'rows;
                }
            }
        }
        encode_row[i] = true;
        for (k, imgs) in per_view.into_iter().enumerate() {
            inputs[k].push((i, imgs));
        }
    }

    // Encode view by view, all rows of the batch together.
    let mut grids: Vec<Vec<CodeGrid>> = vec![Vec::new(); n];
    for (k, rows) in inputs.into_iter().enumerate() {
        let flat: Vec<RgbImage> = rows.iter().flat_map(|(_, v)| v.iter().cloned()).collect();
        let out = encode_images(model, &flat, cfg.batch_size)?;
        let mut it = out.into_iter();
        for (i, imgs) in &rows {
            for _ in 0..imgs.len() {
                grids[*i].push(
                    it.next()
                        .ok_or_else(|| bad("encoder returned too few grids".into()))?,
                );
            }
        }
        counters.add_extra(
            &format!("images_{}", cfg.views[k].describe()),
            flat.len() as u64,
        );
    }

    // Build vq_codes.
    let fields: Fields = vq_code_fields();
    let (mut size_c, mut kind_c, mut crop_c, mut view_c, mut grid_c) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut code_vals: Vec<u16> = Vec::new();
    let mut code_offsets: Vec<i32> = vec![0];
    let mut row_offsets: Vec<i32> = vec![0];
    let mut row_valid = Vec::with_capacity(n);
    let mut push_grid =
        |image_size: i32, kind: &str, crop: i32, view: i32, grid: i32, codes: &[u16]| {
            size_c.push(image_size);
            kind_c.push(kind.to_string());
            crop_c.push(crop);
            view_c.push(view);
            grid_c.push(grid);
            code_vals.extend_from_slice(codes);
            code_offsets.push(code_vals.len() as i32);
        };
    let mut count = 0i32;
    for i in 0..n {
        if encode_row[i] {
            let mut g = grids[i].iter();
            for v in &cfg.views {
                let (kind, views) = match v {
                    CodeView::Center { .. } => ("center", 1),
                    CodeView::TenCrop { .. } => ("tencrop", 10),
                };
                for view in 0..views {
                    let grid = g.next().ok_or_else(|| bad("missing code grid".into()))?;
                    if grid.height != grid.width {
                        return Err(bad(format!(
                            "non-square code grid {}x{}",
                            grid.height, grid.width
                        )));
                    }
                    push_grid(
                        v.image_size() as i32,
                        kind,
                        v.source_size() as i32,
                        view,
                        grid.height as i32,
                        &grid.codes,
                    );
                    count += 1;
                }
            }
            row_valid.push(true);
        } else if let Some(old) = old_codes.filter(|o| !o.is_null(i)) {
            let v = old.value(i);
            let s = v.as_struct();
            let ints = |name: &str| {
                s.column_by_name(name)
                    .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>())
                    .cloned()
                    .ok_or_else(|| bad(format!("vq_codes has no int32 field {name}")))
            };
            let (a, c, vw, gr) = (
                ints("image_size")?,
                ints("crop_size")?,
                ints("view")?,
                ints("grid")?,
            );
            let kinds = s
                .column_by_name("kind")
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| bad("vq_codes has no kind field".into()))?;
            let codes = s
                .column_by_name("codes")
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(|| bad("vq_codes has no codes field".into()))?;
            for j in 0..s.len() {
                let cv = codes.value(j);
                let cv = llamagen_catalog::schema::codes_of(cv.as_ref())
                    .ok_or_else(|| bad("vq_codes codes are not int16 codebook indices".into()))?;
                push_grid(
                    a.value(j),
                    kinds.value(j),
                    c.value(j),
                    vw.value(j),
                    gr.value(j),
                    &cv,
                );
                count += 1;
            }
            row_valid.push(true);
        } else {
            row_valid.push(false);
        }
        row_offsets.push(count);
    }
    drop(push_grid);
    let codes_field = match fields[5].data_type() {
        DataType::List(f) => f.clone(),
        other => return Err(bad(format!("unexpected codes type {other}"))),
    };
    let codes = ListArray::try_new(
        codes_field,
        OffsetBuffer::new(code_offsets.into()),
        Arc::new(
            llamagen_catalog::schema::codes_array(&code_vals).map_err(|e| bad(e.to_string()))?,
        ),
        None,
    )
    .map_err(|e| bad(format!("building codes: {e}")))?;
    let items = StructArray::try_new(
        fields.clone(),
        vec![
            Arc::new(Int32Array::from(size_c)),
            Arc::new(StringArray::from(kind_c)),
            Arc::new(Int32Array::from(crop_c)),
            Arc::new(Int32Array::from(view_c)),
            Arc::new(Int32Array::from(grid_c)),
            Arc::new(codes),
        ],
        None,
    )
    .map_err(|e| bad(format!("building vq_codes: {e}")))?;
    let item_field = Arc::new(Field::new("item", DataType::Struct(fields), true));
    let vq_codes = ListArray::try_new(
        item_field,
        OffsetBuffer::new(row_offsets.into()),
        Arc::new(items),
        Some(NullBuffer::from(row_valid)),
    )
    .map_err(|e| bad(format!("building vq_codes: {e}")))?;

    let prov = append_provenance(
        batch,
        &encode_row,
        &ProvenanceEntry {
            stage: cfg.stage_name(),
            model: Some(cfg.model_id.clone()),
            sha256: Some(cfg.weights_sha256.clone()),
            version: Some(format!(
                "llamagen-encode {}; views {}",
                env!("CARGO_PKG_VERSION"),
                cfg.views
                    .iter()
                    .map(CodeView::describe)
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        },
    )?;
    let s = |v: Vec<Option<String>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            col::KEY,
            batch
                .column_by_name(col::KEY)
                .ok_or_else(|| bad("batch has no key column".into()))?
                .clone(),
        ),
        (col::VQ_CODES, Arc::new(vq_codes)),
        (col::STATUS, Arc::new(StringArray::from(st))),
        (col::ERROR_KIND, s(ek)),
        (col::ERROR, s(er)),
        (col::PROVENANCE, prov),
    ];
    let schema_fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(schema_fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(|e| bad(format!("building the output batch: {e}")))
}

/// The `vq` stage: [`vq_batch`] under the catalog's stage contract.
pub struct VqStage {
    pub model: Arc<VqModel>,
    pub cfg: VqStageConfig,
}

impl VqStage {
    /// Checks that `cfg` fits `model`.
    pub fn new(model: Arc<VqModel>, cfg: VqStageConfig) -> Result<Self> {
        cfg.check(&model)?;
        Ok(VqStage { model, cfg })
    }
}

impl llamagen_catalog::stage::Stage for VqStage {
    fn name(&self) -> String {
        self.cfg.stage_name()
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, llamagen_catalog::stage::StageError> {
        Ok(vq_batch(batch, &self.model, &self.cfg, counters)?)
    }
}
