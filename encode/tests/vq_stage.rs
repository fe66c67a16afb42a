//! The `vq` stage's rules for rows without the rendition a view needs.

use std::sync::Arc;

use anyhow::Result;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Builder, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::Device;
use llamagen_catalog::StageCounters;
use llamagen_catalog::schema::{col, image_fields};
use llamagen_encode::vq_stage::{CodeView, VqStageConfig, vq_batch};
use llamagen_encode::{ModelArgs, VqModel};

/// Three ok rows: one with a 32 px rendition, one that ingest found too small for 32 px
/// (`below_image_size_32`), one that simply lacks it.
fn batch() -> Result<RecordBatch> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]));
    let mut jpeg = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )?;
    let mut images = ListBuilder::new(StructBuilder::from_fields(image_fields(), 3)).with_field(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
    );
    let sb = images.values();
    sb.field_builder::<Int32Builder>(0)
        .unwrap()
        .append_value(32);
    sb.field_builder::<Int32Builder>(1)
        .unwrap()
        .append_value(32);
    sb.field_builder::<Int32Builder>(2)
        .unwrap()
        .append_value(32);
    sb.field_builder::<StringBuilder>(3)
        .unwrap()
        .append_value("jpeg");
    sb.field_builder::<BinaryBuilder>(4)
        .unwrap()
        .append_value(&jpeg);
    sb.append(true);
    images.append(true);
    images.append(false);
    images.append(false);
    let mut reasons = ListBuilder::new(StringBuilder::new());
    reasons.append(false);
    reasons.values().append_value("below_image_size_32");
    reasons.append(true);
    reasons.append(false);
    let cols: Vec<(&str, ArrayRef)> = vec![
        (col::KEY, Arc::new(StringArray::from(vec!["a", "b", "c"]))),
        (col::STATUS, Arc::new(StringArray::from(vec!["ok"; 3]))),
        (
            col::ERROR_KIND,
            Arc::new(StringArray::from(vec![None::<&str>; 3])),
        ),
        (
            col::ERROR,
            Arc::new(StringArray::from(vec![None::<&str>; 3])),
        ),
        (col::IMAGES, Arc::new(images.finish())),
        (col::REJECT_REASONS, Arc::new(reasons.finish())),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        cols.into_iter().map(|c| c.1).collect(),
    )?)
}

#[test]
fn rows_too_small_for_a_view_are_dropped_others_fail() -> Result<()> {
    let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/parity/vq_weights.safetensors");
    let model = VqModel::from_file(&weights, &ModelArgs::reduced(), &Device::Cpu)?;
    let cfg = VqStageConfig {
        views: vec![CodeView::Center { image_size: 32 }],
        batch_size: 4,
        model_id: "reduced".into(),
        weights_sha256: "0".repeat(64),
    };
    let mut counters = StageCounters::new("vq");
    let out = vq_batch(&batch()?, &model, &cfg, &mut counters)?;
    let status = out.column_by_name(col::STATUS).unwrap().as_string::<i32>();
    let kind = out
        .column_by_name(col::ERROR_KIND)
        .unwrap()
        .as_string::<i32>();
    let codes = out.column_by_name(col::VQ_CODES).unwrap();
    assert_eq!(status.value(0), "ok");
    assert!(codes.is_valid(0));
    // Too small for 32 px at ingest: LlamaGen's invalid sample, dropped, not failed.
    assert_eq!(status.value(1), "dropped");
    assert!(kind.is_null(1) && codes.is_null(1));
    assert_eq!(counters.dropped.get("below_image_size_32"), Some(&1));
    // No rendition and no reason: an error of the pipeline's configuration.
    assert_eq!(
        (status.value(2), kind.value(2)),
        ("failed", "missing_image_size")
    );
    Ok(())
}
