//! LlamaGen's text-to-image metrics (clean-fid FID, GigaGAN's CLIP score) against the official
//! code paths run in Python on the fixtures (`tests/fixtures/t2i/make_reference.py`, which wrote
//! the images, the stand-in clean Inception and `expected.json`; the CLIP models are the filters'
//! stand-ins).

use std::path::{Path, PathBuf};

use llamagen_eval::clean::{
    self, CleanInception, center_crop_long_edge, clean_resize, crop_long_edge_box, eval_res_image,
    image_files, read_rgb,
};
use llamagen_eval::clip_score::{
    self, CaptionMismatch, ClipModels, caption_tokens, load_sample, natural_sort, prepend_tokens,
    splitlines, tensor2pil, tensor2pil_table,
};
use llamagen_filters::model::ModelOptions;
use llamagen_filters::preprocess::clip_window;
use llamagen_filters::tokenizer::{ClipTokenizer, EOT, SOT};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t2i")
}

fn clip_models() -> ClipModels {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../filters/tests/models");
    ClipModels::load(
        &m.join("clip_b32_image.onnx"),
        &m.join("clip_b32_text.onnx"),
        &opts(),
    )
    .unwrap()
}

fn opts() -> ModelOptions {
    ModelOptions {
        intra_threads: 1,
        batch_size: 2,
        ..ModelOptions::default()
    }
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn rel(got: f64, want: f64) -> f64 {
    ((got - want) / want).abs()
}

const EVAL_RES: Option<u32> = Some(256);

#[test]
fn natural_sort_is_evaldatasets() {
    // Python: sorted(l, key=lambda k: [int(t) if t.isdigit() else t.lower()
    //                                  for t in re.split('([0-9]+)', k)])
    let mut names: Vec<String> = [
        "img10.png",
        "img9.png",
        "Img2.png",
        "img02b.png",
        "a.png",
        "B.png",
        "10.png",
        "9.png",
        "x1y10.png",
        "x1y9.png",
        "x01y9z.png",
        "0001.png",
        "1.png",
        "_1.png",
        "img.png",
        "img1.png",
    ]
    .map(String::from)
    .to_vec();
    natural_sort(&mut names);
    assert_eq!(
        names,
        [
            "0001.png",
            "1.png",
            "9.png",
            "10.png",
            "_1.png",
            "a.png",
            "B.png",
            "img1.png",
            "Img2.png",
            "img02b.png",
            "img9.png",
            "img10.png",
            "img.png",
            "x1y9.png",
            "x01y9z.png",
            "x1y10.png"
        ]
    );
    // A digit run longer than any integer type.
    let mut big: Vec<String> = [
        "a100000000000000000000000000.png",
        "a99999999999999999999.png",
    ]
    .map(String::from)
    .to_vec();
    natural_sort(&mut big);
    assert_eq!(big[0], "a99999999999999999999.png");

    let s = load_sample(&fixtures().join("sample"), CaptionMismatch::Truncate).unwrap();
    let order: Vec<String> = s
        .images
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want: Vec<String> = expected()["sample_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, want);
}

#[test]
fn captions_are_pythons_splitlines() {
    assert_eq!(splitlines("a\nb\n"), ["a", "b"]);
    assert_eq!(splitlines("a\r\nb\rc\n\nd"), ["a", "b", "c", "", "d"]);
    assert_eq!(
        splitlines("a\u{2028}b\x0bc\x1cd\u{85}e"),
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(splitlines(""), Vec::<String>::new());
    assert_eq!(splitlines("\n"), [""]);
    let want = expected();
    let s = load_sample(&fixtures().join("sample"), CaptionMismatch::Truncate).unwrap();
    assert_eq!(s.captions.len(), 6);
    assert_eq!(s.pairs, 5);
    for (c, w) in s.captions.iter().zip(want["captions"].as_array().unwrap()) {
        assert_eq!(c, w.as_str().unwrap());
    }
}

#[test]
fn tensor2pil_round_trip_truncates() {
    let t = tensor2pil_table();
    let want: Vec<u8> = want_u8(&expected()["tensor2pil_table"]);
    assert_eq!(t.to_vec(), want);
    let changed: Vec<usize> = (0..256).filter(|&v| t[v] as usize != v).collect();
    eprintln!("tensor2pil changes {} of 256 values", changed.len());
    // 37/255 normalised and back is 36.99999 in float32: truncated to 36.
    assert_eq!(t[37], 36);
    assert!(changed.iter().all(|&v| t[v] as usize == v - 1));
    assert_eq!((t[0], t[255]), (0, 255));
}

fn want_u8(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

fn row(ids: &[u32]) -> [u32; 77] {
    let mut r = [0u32; 77];
    r[..ids.len()].copy_from_slice(ids);
    r
}

#[test]
fn token_prepending_is_gigagans() {
    let want = expected();
    let prefix = clip_score::prefix_tokens();
    let wp: Vec<u32> = want["prefix_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prefix.to_vec(), wp);
    let captions: Vec<String> = want["captions"].as_array().unwrap()[..5]
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    let tok = ClipTokenizer::bundled();
    for (i, c) in captions.iter().enumerate() {
        let raw: Vec<u32> = tok.tokenize(c).to_vec();
        let wr: Vec<u32> = want["tokens"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(raw, wr, "tokens of caption {i}");
    }
    let got = caption_tokens(&captions);
    for (i, r) in got.chunks_exact(77).enumerate() {
        let w: Vec<u32> = want["prepended_tokens"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(r.to_vec(), w, "prepended tokens of caption {i}");
    }

    // Rules on synthetic rows: a short caption keeps its end token and padding.
    let p = [1, 2, 3];
    let short = prepend_tokens(&row(&[SOT, 10, 11, EOT]), p);
    assert_eq!(&short[..8], &[SOT, 1, 2, 3, 10, 11, EOT, 0]);
    assert_eq!(short[76], 0);
    // End token at 73: moves to 76 exactly.
    let mut ids = vec![SOT];
    ids.extend(100..172u32);
    ids.push(EOT);
    assert_eq!(ids.len(), 74);
    let r = prepend_tokens(&row(&ids), p);
    assert_eq!((r[75], r[76]), (171, EOT));
    // End token at 74..76: cut off; the word in the last column becomes the end token.
    for extra in 1..=3u32 {
        let mut ids = vec![SOT];
        ids.extend(100..172 + extra);
        ids.push(EOT);
        let r = prepend_tokens(&row(&ids), p);
        assert_eq!(r[76], EOT, "{} ids", ids.len());
        assert_eq!(r[75], 171, "{} ids", ids.len());
        assert!(!r[..76].contains(&EOT));
    }
    // A row truncated by tokenize (end token at 76) loses it and gets a new one.
    let long = tok.tokenize(&"word ".repeat(200));
    let r = prepend_tokens(&long, p);
    assert_eq!(r[76], EOT);
    assert_eq!(&r[4..76], &long[1..73]);
}

#[test]
fn eval_res_and_clip_inputs_are_byte_exact() {
    assert_eq!(crop_long_edge_box(300, 171), (64, 0, 171)); // 64.5 -> 64
    assert_eq!(crop_long_edge_box(150, 233), (0, 42, 150)); // 41.5 -> 42
    assert_eq!(crop_long_edge_box(3, 3), (0, 0, 3));
    let want = expected();
    for rec in want["clip_images"].as_array().unwrap() {
        let path = fixtures().join(rec["file"].as_str().unwrap());
        let img = read_rgb(&path).unwrap();
        let mut e = eval_res_image(&img, EVAL_RES);
        assert_eq!((e.width(), e.height()), (256, 256));
        assert_eq!(
            sha(e.as_raw()),
            rec["eval_res_sha256"].as_str().unwrap(),
            "{}: centre crop + LANCZOS",
            path.display()
        );
        tensor2pil(&mut e);
        assert_eq!(
            sha(e.as_raw()),
            rec["tensor2pil_sha256"].as_str().unwrap(),
            "{}: tensor2pil",
            path.display()
        );
        assert_eq!(
            sha(&clip_window(&e, 224)),
            rec["clip_window_sha256"].as_str().unwrap(),
            "{}: CLIP window",
            path.display()
        );
    }
    // No resize: the crop only.
    let img = read_rgb(&fixtures().join("sample/images/2.png")).unwrap();
    let c = eval_res_image(&img, None);
    assert_eq!(c, center_crop_long_edge(&img));
    assert_eq!((c.width(), c.height()), (200, 200));
}

#[test]
fn clean_fid_files_and_inputs_match() {
    let want = expected();
    let files = image_files(&fixtures().join("ref")).unwrap();
    let got: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(fixtures())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let w: Vec<String> = want["ref_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, w, "clean-fid's glob");
    let mut worst = 0f64;
    for rec in want["ref_images"]
        .as_array()
        .unwrap()
        .iter()
        .chain(want["sample_images"].as_array().unwrap())
    {
        let path = fixtures().join(rec["file"].as_str().unwrap());
        let e = eval_res_image(&read_rgb(&path).unwrap(), EVAL_RES);
        assert_eq!(
            sha(e.as_raw()),
            rec["eval_res_sha256"].as_str().unwrap(),
            "{}: centre crop + LANCZOS",
            path.display()
        );
        let x = clean_resize(&e);
        let plane = 299 * 299;
        for (c, s) in f64s(&rec["clean_sum"]).iter().enumerate() {
            let got: f64 = x[c * plane..(c + 1) * plane]
                .iter()
                .map(|&v| v as f64)
                .sum();
            assert!(rel(got, *s) < 1e-9, "{}: channel {c} sum", path.display());
        }
        for p in rec["clean_probes"].as_array().unwrap() {
            let (c, y, xx) = (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
                p[2].as_u64().unwrap() as usize,
            );
            let (g, w) = (x[c * plane + y * 299 + xx] as f64, p[3].as_f64().unwrap());
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!("clean resize: largest probe difference {worst:e}");
    assert!(worst <= 1e-4, "clean resize differs by {worst}");
}

fn features_of(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| f64s(r).into_iter().map(|x| x as f32))
        .collect()
}

#[test]
fn features_and_fid_match_clean_fid() {
    let want = expected();
    let model =
        CleanInception::load(&fixtures().join("clean_inception_standin.onnx"), &opts()).unwrap();
    let progress = std::sync::Mutex::new(Vec::new());
    let r = model
        .folder_features(&fixtures().join("ref"), EVAL_RES, |d, t| {
            progress.lock().unwrap().push((d, t))
        })
        .unwrap();
    assert_eq!(*progress.lock().unwrap(), [(2, 4), (4, 4)]);
    let s = model
        .folder_features(&fixtures().join("sample/images"), EVAL_RES, |_, _| {})
        .unwrap();
    assert_eq!((r.n, r.dim, s.n, s.dim), (4, 2048, 5, 2048));
    // Lossless files: features equal to float rounding. The JPEG: decoded by zune-jpeg here and
    // libjpeg-turbo in PIL, a level apart on some pixels.
    let (mut worst, mut worst_jpeg) = (0f32, 0f32);
    for (got, w, recs) in [
        (
            &r.data,
            features_of(&want["ref_features"]),
            &want["ref_images"],
        ),
        (
            &s.data,
            features_of(&want["sample_features"]),
            &want["sample_images"],
        ),
    ] {
        assert_eq!(got.len(), w.len());
        for (i, (a, b)) in got.chunks_exact(2048).zip(w.chunks_exact(2048)).enumerate() {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let file = recs[i]["file"].as_str().unwrap();
            eprintln!("{file}: largest feature difference {d:e}");
            if file.ends_with(".jpg") {
                worst_jpeg = worst_jpeg.max(d);
            } else {
                worst = worst.max(d);
            }
        }
    }
    assert!(worst <= 1e-5, "features differ by {worst}");
    assert_eq!(worst_jpeg, 0.0, "no JPEG in the lossless folders");

    let (ss, rs) = (s.stats().unwrap(), r.stats().unwrap());
    let mu_sum: f64 = ss.mu.iter().sum();
    let tr: f64 = (0..2048).map(|i| ss.sigma[i * 2048 + i]).sum();
    assert!(rel(mu_sum, want["sample_mu_sum"].as_f64().unwrap()) < 1e-5);
    assert!(rel(tr, want["sample_sigma_trace"].as_f64().unwrap()) < 1e-5);
    let fid = ss.frechet_distance(&rs).unwrap();
    let wf = want["fid"].as_f64().unwrap();
    eprintln!(
        "FID {fid}, clean-fid {wf}: relative difference {:.2e}",
        rel(fid, wf)
    );
    assert!(rel(fid, wf) <= 1e-4);

    // Statistics written and read back as a .npz.
    let tmp = tempfile::tempdir().unwrap();
    let npz = tmp.path().join("ref_stats.npz");
    clean::write_stats_npz(&npz, &rs).unwrap();
    let back = clean::read_stats_npz(&npz).unwrap();
    assert_eq!(back, rs);
}

#[test]
fn clip_score_matches_gigagan() {
    let want = expected();
    let models = clip_models();
    let sample = load_sample(&fixtures().join("sample"), CaptionMismatch::Truncate).unwrap();
    let cos = models.cosines(&sample, EVAL_RES, 30000, |_| {}).unwrap();
    let wc = f64s(&want["cosine"]);
    assert_eq!(cos.len(), wc.len());
    for (i, (g, w)) in cos.iter().zip(&wc).enumerate() {
        assert!((g - w).abs() <= 1e-5, "pair {i}: cosine {g} vs {w}");
    }
    let score = clip_score::clip_score(&cos, 30000).unwrap();
    let ws = want["clip_score"].as_f64().unwrap();
    eprintln!(
        "CLIP score {score}, reference {ws}: relative difference {:.2e}",
        rel(score, ws)
    );
    assert!(rel(score, ws) <= 1e-4);
    // how_many below the number of pairs: the first how_many only.
    let small = models.cosines(&sample, EVAL_RES, 3, |_| {}).unwrap();
    assert_eq!(small.len(), 3);
    let s3 = clip_score::clip_score(&small, 3).unwrap();
    assert!(rel(s3, want["clip_score_small"].as_f64().unwrap()) <= 1e-4);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sample");
    copy_dir(&fixtures().join("sample"), &dir);

    // The fixture has one caption line too many.
    let e = load_sample(&dir, CaptionMismatch::Error)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("6 captions for 5 images") && e.contains("captions.txt"),
        "{e}"
    );

    // A broken image is named, in the CLIP score and in the FID.
    std::fs::write(dir.join("images/7.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let s = load_sample(&dir, CaptionMismatch::Error).unwrap();
    let e = clip_models()
        .cosines(&s, EVAL_RES, 30000, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("7.png"), "{e}");
    let model =
        CleanInception::load(&fixtures().join("clean_inception_standin.onnx"), &opts()).unwrap();
    let e = model
        .folder_features(&dir.join("images"), EVAL_RES, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("7.png"), "{e}");

    // No captions.txt.
    std::fs::remove_file(dir.join("captions.txt")).unwrap();
    let e = load_sample(&dir, CaptionMismatch::Error)
        .unwrap_err()
        .to_string();
    assert!(e.contains("captions.txt"), "{e}");

    // No images folder; an empty reference folder.
    let e = load_sample(tmp.path(), CaptionMismatch::Error)
        .unwrap_err()
        .to_string();
    assert!(e.contains("images"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = model
        .folder_features(&empty, EVAL_RES, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no images"), "{e}");
}

#[test]
fn jpeg_is_within_a_decoder_level() {
    // PIL decodes JPEGs with libjpeg-turbo, the crate with zune-jpeg: pixels may be a level or two
    // apart (as in the filters' CLIP preprocessing, see the README); LANCZOS spreads that over
    // neighbours (this photo at 256 px: a quarter of the values, by 0.26 levels on average).
    let want = expected();
    let jpeg = fixtures().join("jpeg/flower.jpg");
    let got = eval_res_image(&read_rgb(&jpeg).unwrap(), EVAL_RES);
    let pil = read_rgb(&fixtures().join("jpeg/flower_eval_res_pil.png")).unwrap();
    assert_eq!(
        sha(pil.as_raw()),
        want["jpeg"]["eval_res_sha256"].as_str().unwrap()
    );
    let diffs: Vec<u8> = got
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    let off = diffs.iter().filter(|&&d| d > 0).count();
    eprintln!(
        "flower.jpg at 256 px: {off} of {} values differ from PIL's, by at most {max}, mean {mean:.4}",
        diffs.len()
    );
    assert!(max <= 6 && mean <= 0.5, "max {max}, mean {mean}");
    let model =
        CleanInception::load(&fixtures().join("clean_inception_standin.onnx"), &opts()).unwrap();
    let f = model.files_features(&[jpeg], EVAL_RES, |_| {}).unwrap();
    let w: Vec<f32> = f64s(&want["jpeg"]["features"])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let d = f
        .data
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("flower.jpg: largest feature difference {d:e}");
    assert!(d <= 2e-3, "JPEG features differ by {d}");
}
