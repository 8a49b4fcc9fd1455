//! Image loading and CLIP / SAM preprocessing against PIL + HF CLIPImageProcessor + torchvision
//! (fixtures from scripts/fixtures/gen_clip.py).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};
use prs::data::preprocess::{
    clip_pad_colour, clip_preprocess, expand_to_square, load_image, sam_preprocess, CLIP_STD, IMAGENET_STD,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip").join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("preprocess.safetensors"), &Device::Cpu).unwrap()
}

/// (max |a - b|, number of differing elements).
fn diff(a: &Tensor, b: &Tensor) -> (f32, usize) {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut max = 0f32;
    let mut n = 0;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        max = max.max(d);
        if d > 1e-6 {
            n += 1;
        }
    }
    (max, n)
}

/// One u8 level in normalised units for the channel with the smallest std.
fn one_level(std: [f64; 3]) -> f32 {
    (1.0 / 255.0 / std.iter().cloned().fold(f64::INFINITY, f64::min)) as f32
}

#[test]
fn clip_preprocess_matches_llava_and_hf() {
    let exp = expected();
    let tol = one_level(CLIP_STD) + 1e-5;
    for name in ["a", "b", "c"] {
        let img = load_image(fixture(&format!("img_{name}.png"))).unwrap();
        let x = clip_preprocess(&img, 48).unwrap();
        assert_eq!(x.dims(), &[3, 48, 48]);
        assert_eq!(x.dtype(), DType::F32);
        let (max, n) = diff(&x, &exp[&format!("clip_{name}")]);
        println!(
            "clip img_{name} ({}x{}): max abs error {max:.3e} (one u8 level = {tol:.3e}), {n} of {} values differ",
            img.width(),
            img.height(),
            x.elem_count()
        );
        assert!(max <= tol, "img_{name}: {max}");
    }
}

#[test]
fn sam_preprocess_matches_torchvision() {
    let exp = expected();
    let tol = one_level(IMAGENET_STD) + 1e-5;
    for name in ["a", "b", "c"] {
        let img = load_image(fixture(&format!("img_{name}.png"))).unwrap();
        let x = sam_preprocess(&img, 64).unwrap();
        assert_eq!(x.dims(), &[3, 64, 64]);
        let (max, n) = diff(&x, &exp[&format!("sam_{name}")]);
        println!(
            "sam img_{name}: max abs error {max:.3e} (one u8 level = {tol:.3e}), {n} of {} values differ",
            x.elem_count()
        );
        assert!(max <= tol, "img_{name}: {max}");
    }
}

#[test]
fn expand_to_square_pastes_like_pil() {
    assert_eq!(clip_pad_colour(), [122, 116, 104]);
    let bg = image::Rgb([122u8, 116, 104]);
    // wide: 5x2 -> 5x5, rows (5-2)//2 = 1 ..= 2 hold the image
    let wide = RgbImage::from_fn(5, 2, |x, y| image::Rgb([x as u8, y as u8, 200]));
    let sq = expand_to_square(&wide, clip_pad_colour());
    assert_eq!(sq.dimensions(), (5, 5));
    for (x, y, p) in sq.enumerate_pixels() {
        let want = if (1..3).contains(&y) { *wide.get_pixel(x, y - 1) } else { bg };
        assert_eq!(*p, want, "({x},{y})");
    }
    // tall: 2x5 -> 5x5, columns 1 ..= 2
    let tall = RgbImage::from_fn(2, 5, |x, y| image::Rgb([x as u8, y as u8, 201]));
    let sq = expand_to_square(&tall, clip_pad_colour());
    for (x, y, p) in sq.enumerate_pixels() {
        let want = if (1..3).contains(&x) { *tall.get_pixel(x - 1, y) } else { bg };
        assert_eq!(*p, want, "({x},{y})");
    }
    // odd difference: 4x1 -> offset (4-1)//2 = 1
    let line = RgbImage::from_pixel(4, 1, image::Rgb([1, 2, 3]));
    let sq = expand_to_square(&line, clip_pad_colour());
    assert_eq!(*sq.get_pixel(0, 1), image::Rgb([1, 2, 3]));
    assert_eq!(*sq.get_pixel(0, 2), bg);
}

fn rgb_bytes(img: &DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageRgb8(b) => b.as_raw().clone(),
        other => panic!("load_image returned {:?}, not RGB8", other.color()),
    }
}

#[test]
fn png_modes_decode_like_pil_convert_rgb() {
    let exp = expected();
    for name in ["rgba", "grey", "palette"] {
        let img = load_image(fixture(&format!("img_{name}.png"))).unwrap();
        let want = &exp[&format!("rgb_{name}")];
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!((img.width() as usize, img.height() as usize), (w, h), "{name}");
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rgb_bytes(&img), want, "{name} differs from PIL's convert('RGB')");
    }
}

#[test]
fn sixteen_bit_grey_png_is_scaled_to_eight_bits() {
    let exp = expected();
    let raw: Vec<Vec<f64>> = exp["raw_grey16"].to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let img = load_image(fixture("img_grey16.png")).unwrap();
    let DynamicImage::ImageRgb8(rgb) = &img else { panic!("not RGB8") };
    assert_eq!(rgb.dimensions(), (6, 5));
    for (x, y, p) in rgb.enumerate_pixels() {
        let want = (raw[y as usize][x as usize] / 257.0).round() as i32;
        assert!(p[0] == p[1] && p[1] == p[2]);
        assert!((p[0] as i32 - want).abs() <= 1, "({x},{y}): {} vs {want}", p[0]);
    }
}

#[test]
fn jpeg_decodes_close_to_pil() {
    let exp = expected();
    let img = load_image(fixture("img_jpeg.jpg")).unwrap();
    let want: Vec<u8> = exp["rgb_jpeg"].flatten_all().unwrap().to_vec1().unwrap();
    let got = rgb_bytes(&img);
    assert_eq!(got.len(), want.len());
    let max = got.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    let mean = got.iter().zip(&want).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / got.len() as f64;
    println!("jpeg vs PIL (libjpeg): max abs diff {max} levels, mean {mean:.3}");
    // Different IDCT / chroma upsampling implementations: small differences only.
    assert!(max <= 8 && mean <= 1.0, "max {max}, mean {mean}");
}

fn real_images_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PRS_REAL_IMAGES") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real-images");
    p.is_dir().then_some(p)
}

fn channel_means(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64).unwrap().mean((1, 2)).unwrap().to_vec1().unwrap()
}

#[test]
fn real_images_decode_and_preprocess() {
    let Some(dir) = real_images_dir() else {
        println!("NOTICE: real images not found (../shared/data/real-images or PRS_REAL_IMAGES): skipped");
        return;
    };
    // Written by gen_clip.py only when it found the images; without it, decode and shape checks only.
    let Ok(json) = std::fs::read_to_string(fixture("real_images.json")) else {
        println!("NOTICE: tests/fixtures/clip/real_images.json absent: decoding checked without PIL statistics");
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "jpg")) {
                let img = load_image(&p).unwrap();
                assert_eq!(clip_preprocess(&img, 336).unwrap().dims(), &[3, 336, 336]);
            }
        }
        return;
    };
    let stats: serde_json::Value = serde_json::from_str(&json).unwrap();
    let stats = stats.as_object().unwrap();
    assert_eq!(stats.len(), 4);
    for (name, s) in stats {
        let img = load_image(dir.join(name)).unwrap();
        let (w, h) = (s["width"].as_u64().unwrap() as u32, s["height"].as_u64().unwrap() as u32);
        assert_eq!((img.width(), img.height()), (w, h), "{name}");
        let rgb = rgb_bytes(&img);
        let px = Tensor::from_vec(rgb, (h as usize, w as usize, 3), &Device::Cpu).unwrap();
        let mean: Vec<f64> = px.to_dtype(DType::F64).unwrap().mean((0, 1)).unwrap().to_vec1().unwrap();
        let want = |k: &str| -> Vec<f64> { s[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
        let is_jpeg = name.ends_with(".jpg");
        // PNG decoding is exact; JPEG decoders differ by rounding only, which averages out.
        let tol = if is_jpeg { 0.2 } else { 1e-9 };
        for (c, (a, b)) in mean.iter().zip(want("rgb_mean")).enumerate() {
            assert!((a - b).abs() <= tol, "{name} channel {c} mean {a} vs PIL {b}");
        }
        let clip = clip_preprocess(&img, 336).unwrap();
        assert_eq!(clip.dims(), &[3, 336, 336]);
        let sam = sam_preprocess(&img, 1024).unwrap();
        assert_eq!(sam.dims(), &[3, 1024, 1024]);
        let tol = if is_jpeg { 4e-3 } else { 1e-3 };
        for (k, t) in [("clip336_mean", &clip), ("sam1024_mean", &sam)] {
            let got = channel_means(t);
            let dmax = got.iter().zip(want(k)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            println!("{name}: {k} max channel-mean difference {dmax:.2e}");
            assert!(dmax <= tol, "{name} {k}: {got:?} vs {:?}", want(k));
        }
    }
}

#[test]
fn load_errors_name_the_file() {
    let missing = PathBuf::from("/nonexistent/dir/scan_001.png");
    let err = load_image(&missing).unwrap_err();
    let msg = format!("{err:#}");
    println!("missing: {msg}");
    assert!(msg.contains("/nonexistent/dir/scan_001.png"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"this is not an image at all \x00\x01\x02\x03 garbage").unwrap();
    let msg = format!("{:#}", load_image(&corrupt).unwrap_err());
    println!("corrupt: {msg}");
    assert!(msg.contains(&corrupt.display().to_string()), "{msg}");

    // A PNG cut short after its header.
    let truncated = dir.path().join("truncated.png");
    let bytes = std::fs::read(fixture("img_b.png")).unwrap();
    std::fs::write(&truncated, &bytes[..200]).unwrap();
    let msg = format!("{:#}", load_image(&truncated).unwrap_err());
    println!("truncated: {msg}");
    assert!(msg.contains("truncated.png"), "{msg}");
}
