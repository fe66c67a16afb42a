//! Shards written by llamagen, read back by pyarrow with identical values in every column type,
//! and the dataset read as a Delta table by PyPI's deltalake and polars: the same values and the
//! same version history.

use std::process::Command;
use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    ArrayRef, BinaryArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use llamagen_catalog::arrow::buffer::OffsetBuffer;
use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::schema::{embedding_fields, image_fields, sample_schema, vq_code_fields};
use llamagen_catalog::storage::LocalStorage;
use llamagen_catalog::{Catalog, ShardWriterOptions, Transaction};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn list(item: DataType, lengths: Vec<usize>, values: ArrayRef) -> ListArray {
    ListArray::new(
        Arc::new(Field::new("item", item, lengths.is_empty())),
        OffsetBuffer::from_lengths(lengths),
        values,
        None,
    )
}

#[tokio::test]
async fn pyarrow_reads_back_identical_values() {
    let n = 3usize;
    let keys = ["k0", "k1", "k2"];
    let img: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 1000 + i]).collect();
    let codes: Vec<u16> = (0..n * 4).map(|i| (i * 4099 % 16384) as u16).collect();
    let emb: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..8 * 4).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let ts = 1_763_900_000_123_456i64;

    let images = StructArray::new(
        image_fields(),
        vec![
            Arc::new(Int32Array::from(vec![256; n])) as ArrayRef,
            Arc::new(Int32Array::from(vec![256; n])),
            Arc::new(Int32Array::from(vec![256; n])),
            Arc::new(StringArray::from(vec!["jpeg"; n])),
            Arc::new(BinaryArray::from_iter_values(img.iter())),
        ],
        None,
    );
    let vq = StructArray::new(
        vq_code_fields(),
        vec![
            Arc::new(Int32Array::from(vec![32; n])) as ArrayRef,
            Arc::new(StringArray::from(vec!["center"; n])),
            Arc::new(Int32Array::from(vec![32; n])),
            Arc::new(Int32Array::from(vec![0; n])),
            Arc::new(Int32Array::from(vec![2; n])),
            Arc::new(ListArray::new(
                Arc::new(Field::new("item", DataType::Int16, false)),
                OffsetBuffer::from_lengths(vec![4; n]),
                Arc::new(llamagen_catalog::schema::codes_array(&codes).unwrap()),
                None,
            )),
        ],
        None,
    );
    let t5 = StructArray::new(
        embedding_fields(),
        vec![
            Arc::new(Int32Array::from(vec![2; n])) as ArrayRef,
            Arc::new(Int32Array::from(vec![8; n])),
            Arc::new(StringArray::from(vec!["bf16"; n])),
            Arc::new(BinaryArray::from_iter_values(emb.iter())),
        ],
        None,
    );
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("key", Arc::new(StringArray::from(keys.to_vec()))),
        (
            "url",
            Arc::new(StringArray::from(vec![
                "https://x/ü.jpg",
                "https://y/2.png",
                "http://z/3",
            ])),
        ),
        (
            "text",
            Arc::new(StringArray::from(vec![
                Some("naïve café ☕"),
                None,
                Some(""),
            ])),
        ),
        (
            "width",
            Arc::new(Int64Array::from(vec![Some(640), None, Some(1)])),
        ),
        (
            "similarity",
            Arc::new(Float64Array::from(vec![Some(0.3125), None, Some(-1.5e-7)])),
        ),
        (
            "status",
            Arc::new(StringArray::from(vec!["ok", "dropped", "failed"])),
        ),
        (
            "reject_reasons",
            Arc::new(list(
                DataType::Utf8,
                vec![0, 2, 0],
                Arc::new(StringArray::from(vec!["min_side<256", "watermark>0.8"])),
            )),
        ),
        (
            "score_aesthetic",
            Arc::new(Float32Array::from(vec![Some(5.25f32), Some(0.1), None])),
        ),
        (
            "downloaded_at",
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(ts), None, Some(ts + 1)])
                    .with_timezone("UTC"),
            ),
        ),
        (
            "images",
            Arc::new(list(
                DataType::Struct(image_fields()),
                vec![1; n],
                Arc::new(images),
            )),
        ),
        (
            "vq_codes",
            Arc::new(list(
                DataType::Struct(vq_code_fields()),
                vec![1; n],
                Arc::new(vq),
            )),
        ),
        ("t5_long", Arc::new(t5)),
    ];
    let fields: Vec<Field> = cols
        .iter()
        .map(|(name, a)| {
            let f = sample_schema().field_with_name(name).unwrap().clone();
            Field::new(*name, a.data_type().clone(), f.is_nullable())
        })
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let local = LocalStorage::new(dir.path()).unwrap();
    let ds = Catalog::from_storage(Arc::new(local.clone())).samples();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&batch).await.unwrap();
    let add = w.finish().await.unwrap();
    // A shard is its base file and one column file per group it carries (images, t5, vq).
    assert_eq!(
        add[0].columns.keys().collect::<Vec<_>>(),
        vec!["images", "t5", "vq"]
    );
    let mut paths = vec![local.path_of(&ds.shard_path(&add[0]))];
    for (g, f) in &add[0].columns {
        let table = llamagen_catalog::columns::table_name(ds.name(), g);
        paths.push(local.path_of(&format!("{table}/{}", f.path)));
    }
    ds.commit(Transaction {
        operation: "t".into(),
        add,
        ..Default::default()
    })
    .await
    .unwrap();

    let (head, rows) = dump("dump_shard.py", &paths);
    assert_eq!(head["schema_version"], "3");
    let names: Vec<String> = sample_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(head["columns"], json!(names));
    assert_eq!(rows.len(), n);

    let expect = |i: usize| -> Value {
        json!({
            "key": (keys[i]),
            "url": (["https://x/ü.jpg", "https://y/2.png", "http://z/3"][i]),
            "text": ([json!("naïve café ☕"), Value::Null, json!("")][i]),
            "width": ([json!(640), Value::Null, json!(1)][i]),
            "similarity": ([json!(0.3125), Value::Null, json!(-1.5e-7)][i]),
            "status": (["ok", "dropped", "failed"][i]),
            "reject_reasons": ([json!([]), json!(["min_side<256", "watermark>0.8"]), json!([])][i]),
            "score_aesthetic": ([json!(5.25f32 as f64), json!(0.1f32 as f64), Value::Null][i]),
            "downloaded_at": ([json!(ts), Value::Null, json!(ts + 1)][i]),
            "images": [{"size": 256, "width": 256, "height": 256, "format": "jpeg", "data": sha(&img[i])}],
            "vq_codes": [{"image_size": 32, "kind": "center", "crop_size": 32, "view": 0, "grid": 2,
                          "codes": (codes[i * 4..i * 4 + 4].to_vec())}],
            "t5_long": {"tokens": 2, "dim": 8, "dtype": "bf16", "data": sha(&emb[i])},
        })
    };
    check_rows(&rows, &expect);

    // The dataset as a Delta table: a stage pass (remove + add) on top, then deltalake and polars.
    let r = llamagen_catalog::stage::map_shards(
        &ds,
        "label",
        (0, 1),
        ShardWriterOptions::default(),
        |b: RecordBatch| async move {
            let n = b.num_rows();
            Ok(RecordBatch::try_from_iter(vec![
                ("key", b.column_by_name("key").unwrap().clone()),
                ("label", Arc::new(Int32Array::from(vec![7; n])) as ArrayRef),
            ])
            .unwrap())
        },
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.shards_rewritten, 1);
    let (head, rows) = dump("dump_delta.py", &[dir.path().join("samples")]);
    let versions = ds.versions().await.unwrap();
    assert_eq!(versions, vec![0, 1, 2]);
    assert_eq!(head["versions"], json!(versions));
    assert_eq!(head["version"], json!(2));
    assert_eq!(
        head["operations"],
        json!(["CREATE TABLE", "WRITE", "UPDATE"])
    );
    assert_eq!(head["stages"], json!([Value::Null, "t", "label"]));
    // The column files were written once, by the first commit: the stage pass carried them over.
    assert_eq!(head["groups"], json!({"images": 1, "t5": 1, "vq": 1}));
    assert_eq!(head["schema_version"], "3");
    assert_eq!(head["columns"], json!(names));
    assert_eq!(rows.len(), n);
    for row in &rows {
        assert_eq!(row["label"], json!(7));
    }
    check_rows(&rows, &expect);
}

/// Runs `tests/python/<script> <paths>`; returns its first JSON line and the rows after it.
fn dump(script: &str, paths: &[std::path::PathBuf]) -> (Value, Vec<Value>) {
    let out = Command::new(llamagen_tests::python())
        .arg(
            llamagen_tests::workspace()
                .join("tests/python")
                .join(script),
        )
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let head = lines.next().unwrap();
    (head, lines.collect())
}

fn check_rows(rows: &[Value], expect: &dyn Fn(usize) -> Value) {
    for (i, row) in rows.iter().enumerate() {
        let obj = row.as_object().unwrap();
        for (k, v) in expect(i).as_object().unwrap() {
            assert_eq!(&obj[k], v, "row {i} column {k}");
        }
        // Columns this batch did not set are null in every row.
        for k in [
            "top_caption",
            "score_watermark",
            "t5_short",
            "long_caption",
            "hash",
        ] {
            assert_eq!(obj[k], Value::Null, "row {i} column {k}");
        }
    }
}
