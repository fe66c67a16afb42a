//! Batches read a chunk at a time give the images of the whole batch, in order, from an `.npz`
//! and from a folder; a folder whose images change size between chunks is refused naming the
//! file.

use std::path::PathBuf;

use llamagen_eval::batch::{self, Images};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/inception"
    ))
    .join(name)
}

fn chunks(path: &std::path::Path, chunk: usize) -> (Vec<u8>, Vec<(usize, usize, usize)>) {
    let (mut pixels, mut seen) = (Vec::new(), Vec::new());
    batch::for_each_chunk(path, chunk, |im: &Images, first, total| {
        pixels.extend_from_slice(&im.pixels);
        seen.push((first, im.n, total));
        Ok(())
    })
    .unwrap();
    (pixels, seen)
}

#[test]
fn chunks_are_the_whole_batch_in_order() {
    let npz = fixture("sample.npz");
    let whole = batch::npz_images(&npz).unwrap();
    assert!(whole.n > 7, "the fixture has {} images", whole.n);
    let (pixels, seen) = chunks(&npz, 7);
    assert!(pixels == whole.pixels);
    assert_eq!(seen[0], (0, 7, whole.n));
    assert_eq!(seen.len(), whole.n.div_ceil(7));
    assert_eq!(seen.iter().map(|s| s.1).sum::<usize>(), whole.n);

    // The same images as a folder of PNGs.
    let dir = tempfile::tempdir().unwrap();
    let item = whole.height * whole.width * 3;
    for i in 0..whole.n {
        image::RgbImage::from_raw(
            whole.width as u32,
            whole.height as u32,
            whole.pixels[i * item..(i + 1) * item].to_vec(),
        )
        .unwrap()
        .save(dir.path().join(format!("{i:04}.png")))
        .unwrap();
    }
    let (pixels, seen) = chunks(dir.path(), 5);
    assert!(pixels == whole.pixels);
    assert_eq!(seen.last().unwrap().2, whole.n);
    assert!(batch::folder_images(dir.path()).unwrap().pixels == whole.pixels);

    // An image of another size in a later chunk is named.
    image::RgbImage::new(3, 3)
        .save(dir.path().join("9999.png"))
        .unwrap();
    let err = batch::for_each_chunk(dir.path(), 5, |_, _, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("9999.png") && err.contains("3x3 px"), "{err}");
}
