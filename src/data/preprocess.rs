//! Image loading and the two preprocessing pipelines of PRS-Med, reproducing the Python ones:
//!
//! - CLIP (LLaVA with `image_aspect_ratio = "pad"` + HF `CLIPImageProcessor`): pad to a square
//!   with the mean colour, resize the shortest side with Pillow's bicubic, centre-crop, /255,
//!   normalise with the CLIP mean/std.
//! - SAM (torchvision `Resize((S, S))` on a PIL image + `ToTensor`, then the ImageNet
//!   normalisation SAM applies): resize straight to SxS with Pillow's bilinear, /255, normalise.
//!
//! Pillow resamples 8-bit images with a separable convolution (support widened when
//! downscaling, i.e. antialiased), horizontal pass first, rounding to u8 after each pass.
//! `fast_image_resize`'s convolution uses the same kernels and coefficient layout, but for u8
//! it would run the vertical pass first; running the two passes separately keeps Pillow's order
//! (and its intermediate rounding).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage};

/// OpenAI CLIP normalisation (HF `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// ImageNet normalisation (SAM's pixel_mean / pixel_std divided by 255).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Resampling kernels as Pillow names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (cubic convolution a = -0.5, i.e. Catmull-Rom, support 2).
    Bicubic,
}

impl Resample {
    fn alg(self) -> ResizeAlg {
        ResizeAlg::Convolution(match self {
            Resample::Bilinear => FilterType::Bilinear,
            Resample::Bicubic => FilterType::CatmullRom,
        })
    }
}

/// Decodes an image file as stored (grey, RGB, 16-bit...), the format guessed from its bytes;
/// the one decoder for images and masks, so every bad file gives the same message.
///
/// A truncated file is an error, not a partly grey image: the JPEG decoder pads missing scan
/// data silently, so PNG and JPEG files are first walked marker by marker / chunk by chunk
/// ([`check_complete`]) and must reach their end marker (JPEG EOI, PNG IEND).
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let decode = || -> Result<DynamicImage> {
        // One read: the structure check and the decoder see the same bytes.
        let bytes = std::fs::read(path)?;
        decode_image_bytes(&bytes, Some(path))
    };
    decode().with_context(|| format!("cannot load image {}", path.display()))
}

/// Decodes an encoded image held in memory (an upload); `name`'s extension gives the format
/// when the content gives none (as `ImageReader::open`), so the decoder says what is wrong
/// with, say, a text file named .png.
pub fn decode_image_bytes(bytes: &[u8], name: Option<&Path>) -> Result<DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes));
    if let Some(f) = name.and_then(|n| image::ImageFormat::from_path(n).ok()) {
        reader.set_format(f);
    }
    let reader = reader.with_guessed_format()?;
    let Some(format) = reader.format() else { bail!("unrecognised image format (expected PNG or JPEG)") };
    check_complete(bytes, format)?;
    Ok(reader.decode()?)
}

/// 8-bit RGB, as every model input starts (see [`load_image`]).
pub fn to_rgb(img: DynamicImage) -> DynamicImage {
    match img {
        DynamicImage::ImageRgb8(_) => img,
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

/// Checks that an encoded PNG, JPEG or BMP file is complete (not cut short); other formats, and
/// bytes without the format's signature, are left to the decoder, which names the problem.
pub fn check_complete(bytes: &[u8], format: image::ImageFormat) -> Result<()> {
    match format {
        image::ImageFormat::Png if bytes.starts_with(b"\x89PNG\r\n\x1a\n") => png_complete(bytes),
        image::ImageFormat::Jpeg if bytes.starts_with(&[0xFF, 0xD8]) => jpeg_complete(bytes),
        image::ImageFormat::Bmp if bytes.starts_with(b"BM") => bmp_complete(bytes),
        _ => Ok(()),
    }
}

/// Walks the PNG chunks (length, type, data, CRC) up to IEND.
fn png_complete(b: &[u8]) -> Result<()> {
    let n = b.len();
    let mut i = 8; // signature
    while i + 8 <= n {
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        if !kind.iter().all(u8::is_ascii_alphabetic) {
            bail!("corrupt PNG: no valid chunk at byte {i}");
        }
        let end = i + 12 + len; // length + type + data + CRC
        if end > n {
            bail!(
                "truncated PNG: chunk {} at byte {i} needs {} bytes, the file ends after {n}",
                String::from_utf8_lossy(kind),
                end
            );
        }
        if kind == b"IEND" {
            return Ok(());
        }
        i = end;
    }
    bail!("truncated PNG: the file ends after {n} bytes without its IEND chunk")
}

/// Walks the JPEG segments (skipping each by its length) and the entropy-coded scan data (where
/// 0xFF is always followed by a stuffed 0x00 or a restart marker) until the EOI marker FF D9.
/// Walking, rather than looking for FF D9 anywhere, ignores an EOI inside an embedded thumbnail.
fn jpeg_complete(b: &[u8]) -> Result<()> {
    let n = b.len();
    let mut i = 2; // SOI
    let mut scans = 0;
    loop {
        // The next marker: 0xFF followed by a byte that is neither stuffing (00), fill (FF) nor
        // a restart marker (D0-D7, standalone inside scan data).
        let Some(at) =
            (i..n.saturating_sub(1)).find(|&k| b[k] == 0xFF && !matches!(b[k + 1], 0x00 | 0xFF | 0xD0..=0xD7 | 0x01))
        else {
            let what = if scans == 0 { "before its image data" } else { "inside its image data" };
            bail!("truncated JPEG: the file ends after {n} bytes {what}, without the end-of-image marker FF D9");
        };
        let marker = b[at + 1];
        match marker {
            0xD9 => return Ok(()),
            0xD8 => {
                // A stray SOI has no length.
                i = at + 2;
                continue;
            }
            _ => {}
        }
        if at + 4 > n {
            bail!("truncated JPEG: the file ends after {n} bytes inside marker FF {marker:02X}");
        }
        let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
        if at + 2 + len > n {
            bail!(
                "truncated JPEG: segment FF {marker:02X} at byte {at} needs {} bytes, the file has {n}",
                at + 2 + len
            );
        }
        if marker == 0xDA {
            scans += 1;
        }
        i = at + 2 + len;
    }
}

/// A BMP's header states its file size.
fn bmp_complete(b: &[u8]) -> Result<()> {
    if b.len() < 6 {
        bail!("truncated BMP: {} bytes", b.len());
    }
    let want = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) as usize;
    // Some writers leave the size field 0; then the decoder's own reads are the check.
    if want > b.len() {
        bail!("truncated BMP: the header says {want} bytes, the file has {}", b.len());
    }
    Ok(())
}

/// Decodes PNG (8/16-bit, grey, palette, with or without alpha) or JPEG and converts to 8-bit
/// RGB. Alpha is dropped, not composited (as PIL's `.convert("RGB")`). 16-bit samples are scaled
/// to 8 bits (PIL would clip 16-bit greyscale to 255 instead; we keep the image usable).
/// The format is detected from the content, not the extension.
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    Ok(to_rgb(decode_image(path.as_ref())?))
}

/// LLaVA's `expand2square` background: `tuple(int(x * 255) for x in image_mean)` = (122, 116, 104).
pub fn clip_pad_colour() -> [u8; 3] {
    CLIP_MEAN.map(|m| (m * 255.0) as u8)
}

/// LLaVA's `expand2square`: the image pasted on a square canvas of side max(w, h) filled with
/// `colour`, centred along the short side with PIL's integer offset `(long - short) // 2`.
pub fn expand_to_square(img: &RgbImage, colour: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut canvas = RgbImage::from_pixel(side, side, image::Rgb(colour));
    let (x, y) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    image::imageops::replace(&mut canvas, img, x as i64, y as i64);
    canvas
}

/// One resampling pass with fast_image_resize (only one axis changes when called from
/// [`resize_pillow`]).
fn resize_pass(src: &[u8], (sw, sh): (u32, u32), (dw, dh): (u32, u32), filter: Resample) -> Result<Vec<u8>> {
    let src = ImageRef::new(sw, sh, src, PixelType::U8x3).context("resize: source buffer")?;
    let mut dst = Image::new(dw, dh, PixelType::U8x3);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(filter.alg()))
        .with_context(|| format!("resizing {sw}x{sh} to {dw}x{dh}"))?;
    Ok(dst.into_vec())
}

/// `PIL.Image.resize((w, h), filter)` for an RGB image: horizontal pass, then vertical pass.
pub fn resize_pillow(img: &RgbImage, w: u32, h: u32, filter: Resample) -> Result<RgbImage> {
    let (sw, sh) = img.dimensions();
    if w == 0 || h == 0 || sw == 0 || sh == 0 {
        bail!("cannot resize a {sw}x{sh} image to {w}x{h}");
    }
    let mut buf = None;
    if w != sw {
        buf = Some(resize_pass(img.as_raw(), (sw, sh), (w, sh), filter)?);
    }
    if h != sh {
        let src = buf.as_deref().unwrap_or(img.as_raw());
        buf = Some(resize_pass(src, (w, sh), (w, h), filter)?);
    }
    match buf {
        Some(b) => RgbImage::from_raw(w, h, b).context("resize: output buffer size"),
        None => Ok(img.clone()),
    }
}

/// Per-channel lookup table u8 -> normalised f32.
type Lut = [[f32; 256]; 3];

/// HF's `rescale` (u8 * (1/255) in f64, cast to f32) then `normalize` in f32.
fn hf_lut(mean: [f64; 3], std: [f64; 3]) -> Box<Lut> {
    let mut lut = Box::new([[0f32; 256]; 3]);
    for c in 0..3 {
        for v in 0..256 {
            let x = (v as f64 * (1.0 / 255.0)) as f32;
            lut[c][v] = (x - mean[c] as f32) / std[c] as f32;
        }
    }
    lut
}

/// torchvision's `ToTensor` (u8 / 255 in f32) then `Normalize` in f32.
fn torchvision_lut(mean: [f64; 3], std: [f64; 3]) -> Box<Lut> {
    let mut lut = Box::new([[0f32; 256]; 3]);
    for c in 0..3 {
        for v in 0..256 {
            lut[c][v] = (v as f32 / 255.0 - mean[c] as f32) / std[c] as f32;
        }
    }
    lut
}

/// The `size`x`size` window at (x0, y0) of `img` as a normalised (3, size, size) f32 tensor.
fn to_chw(img: &RgbImage, x0: usize, y0: usize, size: usize, lut: &Lut) -> Result<Tensor> {
    let w = img.width() as usize;
    let raw = img.as_raw();
    let plane = size * size;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for y in 0..size {
        let row = &raw[((y0 + y) * w + x0) * 3..][..size * 3];
        let o = y * size;
        for (x, px) in row.chunks_exact(3).enumerate() {
            r[o + x] = lut[0][px[0] as usize];
            g[o + x] = lut[1][px[1] as usize];
            b[o + x] = lut[2][px[2] as usize];
        }
    }
    Ok(Tensor::from_vec(out, (3, size, size), &Device::Cpu)?)
}

fn as_rgb8(img: &DynamicImage) -> std::borrow::Cow<'_, RgbImage> {
    match img {
        DynamicImage::ImageRgb8(b) => std::borrow::Cow::Borrowed(b),
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    }
}

/// CLIP input as LLaVA computes it (`image_aspect_ratio = "pad"`): (3, size, size) f32 on CPU.
pub fn clip_preprocess(img: &DynamicImage, size: usize) -> Result<Tensor> {
    if size == 0 {
        bail!("clip_preprocess: size must be positive");
    }
    let img = expand_to_square(&as_rgb8(img), clip_pad_colour());
    // HF `shortest_edge` resize: short side -> size, long side -> int(size * long / short).
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (short, long) = (w.min(h), w.max(h));
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h { (size, new_long) } else { (new_long, size) };
    let img = resize_pillow(&img, nw as u32, nh as u32, Resample::Bicubic)?;
    // HF centre crop offsets.
    let (top, left) = ((nh - size) / 2, (nw - size) / 2);
    to_chw(&img, left, top, size, &hf_lut(CLIP_MEAN, CLIP_STD))
}

/// SAM input as PRS-Med computes it: (3, size, size) f32 on CPU, aspect ratio not kept.
pub fn sam_preprocess(img: &DynamicImage, size: usize) -> Result<Tensor> {
    if size == 0 {
        bail!("sam_preprocess: size must be positive");
    }
    let img = resize_pillow(&as_rgb8(img), size as u32, size as u32, Resample::Bilinear)?;
    to_chw(&img, 0, 0, size, &torchvision_lut(IMAGENET_MEAN, IMAGENET_STD))
}
