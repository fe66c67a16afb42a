//! LAION's real aesthetic heads (bundled .pth files) against reference outputs computed with
//! numpy from the same checkpoints (tests/aesthetic/make_reference.py).

use llamagen_filters::heads::{Head, Layout, TorchHead};

fn assets(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/assets/laion-aesthetic/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// make_reference.py `embedding_input(n, d)`.
fn embedding_input(n: usize, d: usize) -> Vec<f32> {
    let mut v = Vec::new();
    for b in 0..n {
        let row: Vec<f64> = (0..d)
            .map(|i| {
                let i = i as f64;
                (0.1 * i + b as f64).cos() + 0.05 * b as f64 * (0.37 * i).sin()
            })
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.extend(row.iter().map(|x| (x / norm) as f32));
    }
    v
}

#[test]
fn real_heads_match_the_reference() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/aesthetic/reference_outputs.json"
    ))
    .unwrap();
    let refs: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, layout) in [
        ("sac+logos+ava1-l14-linearMSE.pth", Layout::V2Linear),
        ("sa_0_4_vit_l_14_linear.pth", Layout::V1Linear),
        ("sa_0_4_vit_b_32_linear.pth", Layout::V1Linear),
    ] {
        let r = &refs["heads"][name];
        let d = r["dim"].as_u64().unwrap() as usize;
        let head = Head::from_pth_bytes(name, &assets(name)).unwrap();
        let llamagen_filters::heads::HeadKind::Torch(t) = &head.kind else {
            panic!("torch head")
        };
        assert_eq!((t.layout, t.input_dim()), (layout, d));
        let got = head.score(&embedding_input(4, d), 4, d).unwrap();
        let want: Vec<f64> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-4,
                "{name}: got {got:?}, want {want:?}"
            );
        }
        let zero = t.forward(&vec![0.0; d], 1)[0] as f64;
        assert!(
            (zero - r["score_of_zero"].as_f64().unwrap()).abs() < 1e-5,
            "{name}: bias {zero}"
        );
    }
}

#[test]
fn bundled_v2_head_is_the_published_file() {
    let h = Head::aesthetic_v2();
    assert_eq!(
        h.sha256,
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    );
    // Unnormalised embeddings are refused rather than scored 20-30.
    let e = h.score(&vec![1.0; 768], 1, 768).err().expect("norm check");
    assert!(e.to_string().contains("norm"), "{e}");
    // Corrupt checkpoints are refused with their name.
    let e = TorchHead::from_pth("bad.pth", b"not a zip")
        .err()
        .expect("bad file");
    assert!(e.to_string().contains("bad.pth"), "{e}");
}
