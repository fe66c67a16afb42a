//! The catalog loader on small synthetic catalogs: usable rows, seeded shuffling, rank
//! sharding, crop and caption choice, left padding and masks.

use std::collections::{BTreeSet, HashSet};

use anyhow::Result;
use candle_core::Device;
use llamagen_train::ModelType;
use llamagen_train::data::{CatalogLoader, DataConfig, SampleSpec};
use llamagen_train::gpt::Condition;
use llamagen_train::synthetic::{SyntheticSpec, write_synthetic_catalog};

fn c2i_catalog(dir: &std::path::Path) -> Result<String> {
    let root = dir.join("cat").display().to_string();
    write_synthetic_catalog(
        &root,
        &SyntheticSpec {
            shards: 3,
            rows_per_shard: 10,
            image_sizes: vec![64],
            failed_every: 5,
            ..SyntheticSpec::default()
        },
    )?;
    Ok(root)
}

fn c2i_spec() -> SampleSpec {
    SampleSpec {
        model_type: ModelType::C2i,
        image_size: 64,
        grid: 4,
        caption_tokens: 1,
        caption_dim: 32,
    }
}

fn data(root: &str, window: usize) -> DataConfig {
    DataConfig {
        root: root.to_string(),
        shuffle_window: window,
        ..DataConfig::default()
    }
}

#[test]
fn ranks_split_each_epoch_and_the_order_is_seeded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = c2i_catalog(dir.path())?;
    // 30 rows, every 5th failed: 24 usable.
    let mut r0 = CatalogLoader::open(&data(&root, 2), c2i_spec(), 7, 0, 2)?;
    let mut r1 = CatalogLoader::open(&data(&root, 2), c2i_spec(), 7, 1, 2)?;
    assert_eq!(r0.num_samples(), 24);
    assert_eq!(r0.per_rank(), 12);
    let epoch = |l: &mut CatalogLoader, e: u64| -> Vec<(u32, u32)> {
        (0..12)
            .map(|i| {
                let (ep, s, r) = l.locate(e * 12 + i);
                assert_eq!(ep, e);
                (s, r)
            })
            .collect()
    };
    let a0 = epoch(&mut r0, 0);
    let a1 = epoch(&mut r1, 0);
    let all: BTreeSet<_> = a0.iter().chain(&a1).copied().collect();
    assert_eq!(all.len(), 24, "the ranks cover every usable row once");
    assert!(
        all.iter().all(|&(_, r)| r % 5 != 4),
        "failed rows are never read"
    );
    // Seeded: the same again; another epoch or seed permutes differently.
    let mut again = CatalogLoader::open(&data(&root, 2), c2i_spec(), 7, 0, 2)?;
    assert_eq!(epoch(&mut again, 0), a0);
    assert_ne!(epoch(&mut r0, 1), a0);
    let mut other = CatalogLoader::open(&data(&root, 2), c2i_spec(), 8, 0, 2)?;
    assert_ne!(epoch(&mut other, 0), a0);
    // A window of one shard reads shards one after the other.
    let mut w1 = CatalogLoader::open(&data(&root, 1), c2i_spec(), 7, 0, 1)?;
    let shards: Vec<u32> = (0..24).map(|k| w1.locate(k).1).collect();
    let changes = shards.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(changes, 2, "{shards:?}");
    Ok(())
}

#[test]
fn uneven_rank_split_pads_by_wrapping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = c2i_catalog(dir.path())?;
    let mut ls: Vec<CatalogLoader> = (0..5)
        .map(|r| CatalogLoader::open(&data(&root, 4), c2i_spec(), 1, r, 5))
        .collect::<Result<_, _>>()?;
    assert_eq!(ls[0].per_rank(), 5); // ceil(24 / 5)
    let mut seen = HashSet::new();
    for l in &mut ls {
        for k in 0..5 {
            let (_, s, r) = l.locate(k);
            seen.insert((s, r));
        }
    }
    assert_eq!(seen.len(), 24);
    Ok(())
}

#[test]
fn c2i_samples_pick_one_of_ten_crops_per_sample() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = c2i_catalog(dir.path())?;
    let mut l = CatalogLoader::open(&data(&root, 4), c2i_spec(), 3, 0, 1)?;
    // The same row across epochs: the crop varies, the label does not.
    let (_, s0, r0) = l.locate(0);
    let mut crops = HashSet::new();
    let mut labels = HashSet::new();
    for e in 0..30u64 {
        for i in 0..24 {
            let k = e * 24 + i;
            let (_, s, r) = l.locate(k);
            if (s, r) == (s0, r0) {
                let smp = l.sample(k)?;
                assert_eq!(smp.tokens.len(), 16);
                assert!(smp.tokens.iter().all(|&t| t < 64));
                crops.insert(smp.tokens.clone());
                labels.insert(smp.label);
            }
        }
    }
    assert_eq!(labels.len(), 1);
    assert!(
        crops.len() >= 5,
        "{} distinct crops in 30 epochs",
        crops.len()
    );
    let b = l.batch(5, 3, &Device::Cpu)?;
    assert_eq!(b.tokens.dims(), &[3, 16]);
    assert!(matches!(&b.cond, Condition::Class(t) if t.dims() == [3]));
    assert!(b.mask.is_none() && b.valid.is_none());
    Ok(())
}

#[test]
fn t2i_batches_left_pad_mask_and_mark_dummies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("t2i").display().to_string();
    write_synthetic_catalog(
        &root,
        &SyntheticSpec {
            shards: 2,
            rows_per_shard: 20,
            image_sizes: vec![64, 128],
            num_classes: None,
            caption_dim: 8,
            max_caption_tokens: 12,
            no_caption_every: 4,
            ..SyntheticSpec::default()
        },
    )?;
    let spec = SampleSpec {
        model_type: ModelType::T2i,
        image_size: 128,
        grid: 8,
        caption_tokens: 10,
        caption_dim: 8,
    };
    // Short captions have at most 6 tokens, long ones up to 12 (truncated to 10).
    let with_p = |p: f64| -> Result<CatalogLoader> {
        let cfg = DataConfig {
            short_caption_prob: p,
            ..data(&root, 2)
        };
        Ok(CatalogLoader::open(&cfg, spec, 5, 0, 1)?)
    };
    let caption_lens = |l: &mut CatalogLoader| -> Result<Vec<usize>> {
        (0..400)
            .filter_map(|k| l.sample(k).map(|s| s.caption.map(|(n, _)| n)).transpose())
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    };
    assert!(caption_lens(&mut with_p(1.0)?)?.iter().all(|&n| n <= 6));
    assert!(caption_lens(&mut with_p(0.0)?)?.iter().any(|&n| n > 6));
    // At 0.3, per row, the minority caption variant is the short one about 30% of the time.
    let mut l = with_p(0.3)?;
    let mut variants: std::collections::HashMap<
        (u32, u32),
        std::collections::HashMap<Vec<u32>, usize>,
    > = Default::default();
    for k in 0..400u64 {
        let (_, sh, r) = l.locate(k);
        if let Some((_, v)) = l.sample(k)?.caption {
            let bits = v.iter().map(|x| x.to_bits()).collect();
            *variants
                .entry((sh, r))
                .or_default()
                .entry(bits)
                .or_default() += 1;
        }
    }
    let minority: usize = variants
        .values()
        .map(|m| {
            if m.len() > 1 {
                *m.values().min().unwrap()
            } else {
                0
            }
        })
        .sum();
    assert!(
        (45..=120).contains(&minority),
        "{minority} of 300 samples used the short caption"
    );
    assert_eq!(l.num_samples(), 40);
    let (mut dummies, mut n) = (0, 0);
    let mut lens = Vec::new();
    for k in 0..400 {
        let s = l.sample(k)?;
        assert_eq!(s.tokens.len(), 64);
        match &s.caption {
            None => {
                assert!(!s.valid);
                dummies += 1;
            }
            Some((len, v)) => {
                assert!(s.valid && *len <= 10 && v.len() == len * 8);
                lens.push(*len);
                n += 1;
            }
        }
    }
    assert_eq!(dummies, 100, "every 4th row has no t5_long");
    assert_eq!(n, 300);
    let b = l.batch(0, 8, &Device::Cpu)?;
    let Condition::Caption(cap) = &b.cond else {
        panic!("t2i batch without captions")
    };
    assert_eq!(cap.dims(), &[8, 10, 8]);
    let mask = b.mask.as_ref().unwrap();
    let s = 10 + 64 - 1;
    assert_eq!(mask.dims(), &[8, 1, s, s]);
    let valid = b.valid.as_ref().unwrap().to_vec1::<f32>()?;
    let cap = cap.to_vec3::<f32>()?;
    let mask = b.mask.as_ref().unwrap().squeeze(1)?.to_vec3::<u8>()?;
    for i in 0..8 {
        let s_i = l.sample(i as u64)?;
        let pad = match &s_i.caption {
            Some((len, _)) => 10 - len,
            None => 0,
        };
        assert_eq!(valid[i], if s_i.valid { 1.0 } else { 0.0 });
        for t in 0..10 {
            let zero = cap[i][t].iter().all(|&x| x == 0.0);
            assert_eq!(
                zero,
                t < pad || s_i.caption.is_none(),
                "sample {i} token {t}"
            );
            // Padding columns are blocked for every later row; the diagonal is open.
            assert_eq!(mask[i][s - 1][t], u8::from(t >= pad));
            assert_eq!(mask[i][t][t], 1);
        }
        assert_eq!(mask[i][12][13], 0, "causal");
    }
    Ok(())
}

#[test]
fn an_empty_or_unusable_catalog_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = c2i_catalog(dir.path())?;
    let e = CatalogLoader::open(
        &data(&dir.path().join("none").display().to_string(), 4),
        c2i_spec(),
        0,
        0,
        1,
    )
    .err()
    .expect("no shards");
    assert!(e.to_string().contains("no committed shards"), "{e}");
    let wrong_size = SampleSpec {
        image_size: 256,
        grid: 16,
        ..c2i_spec()
    };
    let e = CatalogLoader::open(&data(&root, 4), wrong_size, 0, 0, 1)
        .err()
        .expect("no rows at 256 px");
    assert!(e.to_string().contains("no usable"), "{e}");
    assert!(CatalogLoader::open(&data(&root, 4), c2i_spec(), 0, 2, 2).is_err());
    Ok(())
}
