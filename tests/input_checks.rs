//! Inputs checked where they enter: truncated image files.

use image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage};
use prs::data::dataset::{check_rows, load_mask, read_rows, DatasetOptions, ValidationError};
use prs::data::preprocess::{decode_image, load_image};

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A textured RGB picture (so JPEG scan data is most of the file).
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([((x * 7 + y * 3) % 256) as u8, ((x * x + y * 5) % 251) as u8, ((x ^ y) * 9 % 256) as u8])
    })
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

// ---------------------------------------------------------------- truncated images

/// Every cut of a PNG, JPEG or BMP (headers, image data, the trailer, the last byte) is an error
/// naming the file; the whole file decodes to the original.
#[test]
fn truncated_png_and_jpeg_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = DynamicImage::ImageRgb8(picture(96, 64));
    let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(40, 30, |x, y| Luma([(x * 1500 + y * 7) as u16])));
    let cases = [
        ("rgb.png", encode(&rgb, ImageFormat::Png)),
        ("grey16.png", encode(&grey16, ImageFormat::Png)),
        ("rgb.jpg", encode(&rgb, ImageFormat::Jpeg)),
        ("grey.jpg", encode(&DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Jpeg)),
        ("rgb.bmp", encode(&rgb, ImageFormat::Bmp)),
    ];
    for (name, bytes) in &cases {
        let full = dir.path().join(name);
        std::fs::write(&full, bytes).unwrap();
        let img = decode_image(&full).unwrap();
        assert_eq!(img.width() * img.height(), if name.starts_with("grey16") { 1200 } else { 96 * 64 }, "{name}");
        let n = bytes.len();
        let cuts = [40, n / 10, n * 3 / 10, n * 6 / 10, n * 9 / 10, n - 2, n - 1];
        for cut in cuts {
            let path = dir.path().join(format!("cut{cut}_{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = err_text(decode_image(&path));
            assert!(e.contains(&path.display().to_string()), "{name} cut at {cut}/{n}: {e}");
            assert!(e.contains("truncated"), "{name} cut at {cut}/{n}: {e}");
            // Images and masks share the decoder.
            assert!(err_text(load_image(&path)).contains("truncated"));
            assert!(err_text(load_mask(&path)).contains(&path.display().to_string()));
        }
    }
}

/// An end-of-image marker inside an embedded thumbnail (before the scan) does not make a
/// JPEG cut inside its scan look complete; bytes after the real end are accepted.
#[test]
fn jpeg_completeness_follows_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(80, 80)), ImageFormat::Jpeg);
    // An APP15 segment (ignored by decoders) holding a thumbnail-like FF D8 ... FF DA ... FF D9.
    let payload = [0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0xD9];
    let mut with_app = jpeg[..2].to_vec();
    with_app.extend([0xFF, 0xEF, 0x00, (payload.len() + 2) as u8]);
    with_app.extend(payload);
    with_app.extend(&jpeg[2..]);
    let full = dir.path().join("app.jpg");
    std::fs::write(&full, &with_app).unwrap();
    assert_eq!(decode_image(&full).unwrap().width(), 80);
    let cut = dir.path().join("app_cut.jpg");
    std::fs::write(&cut, &with_app[..with_app.len() * 6 / 10]).unwrap();
    let e = err_text(decode_image(&cut));
    assert!(e.contains("truncated JPEG") && e.contains("inside its image data"), "{e}");

    let mut padded = jpeg.clone();
    padded.extend([0u8; 64]);
    let p = dir.path().join("padded.jpg");
    std::fs::write(&p, &padded).unwrap();
    assert_eq!(decode_image(&p).unwrap().width(), 80, "trailing bytes after EOI are harmless");
}

/// A truncated file in a dataset is reported on its CSV row.
#[test]
fn truncated_image_in_a_dataset_is_reported_on_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(32, 32)), ImageFormat::Jpeg);
    std::fs::write(root.join("a.jpg"), &jpeg[..jpeg.len() * 6 / 10]).unwrap();
    GrayImage::from_fn(32, 32, |x, _| Luma([if x > 20 { 255 } else { 0 }])).save(root.join("a_mask.png")).unwrap();
    let csv = root.join("plain.csv");
    std::fs::write(&csv, "image,mask,question,answer,modality\na.jpg,a_mask.png,Where?,Right.,polyp_endoscopy\n")
        .unwrap();
    let read = read_rows(&csv, &DatasetOptions::default()).unwrap();
    let e = check_rows(read.rows, vec![], false).unwrap_err();
    let v = e.downcast_ref::<ValidationError>().unwrap();
    assert_eq!((v.problems.len(), v.problems[0].line), (1, 2), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("{}:2: image: cannot load image", csv.display())), "{text}");
    assert!(text.contains("truncated JPEG"), "{text}");
}
