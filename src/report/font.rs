//! A built-in 5x7 bitmap font (plus two descender rows) for ASCII 32..=126, so chart labels
//! need no system fonts. Glyphs are written as pictures: rows separated by spaces, `#` = ink,
//! `.` = blank, missing rows blank; row 7 is the baseline's first row below.

use image::{Rgb, RgbImage};

/// Glyph cell width and height in font pixels.
pub const GLYPH_W: u32 = 5;
pub const GLYPH_H: u32 = 9;
/// Horizontal advance per character and line height, in font pixels.
pub const ADVANCE: u32 = GLYPH_W + 1;
pub const LINE_H: u32 = GLYPH_H + 1;
/// Height of capitals and digits (rows 0..7), used to centre text vertically.
pub const CAP_H: u32 = 7;

/// Parses a glyph picture at compile time (a malformed picture fails the build).
const fn g(pic: &str) -> [u8; GLYPH_H as usize] {
    let b = pic.as_bytes();
    let mut rows = [0u8; GLYPH_H as usize];
    let (mut r, mut c, mut i) = (0usize, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b' ' => {
                r += 1;
                c = 0;
            }
            b'#' => {
                rows[r] |= 1 << (GLYPH_W as usize - 1 - c);
                c += 1;
            }
            b'.' => c += 1,
            _ => panic!("glyph pictures use only '#', '.' and ' '"),
        }
        assert!(c <= GLYPH_W as usize && r < GLYPH_H as usize, "glyph picture too large");
        i += 1;
    }
    rows
}

const FIRST: u8 = b' ';
const LAST: u8 = b'~';

#[rustfmt::skip]
const GLYPHS: [[u8; GLYPH_H as usize]; (LAST - FIRST + 1) as usize] = [
    g(""),                                                        // space
    g("..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.."),               // !
    g(".#.#. .#.#. .#.#."),                                       // "
    g(".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#."),               // #
    g("..#.. .#### #.#.. .###. ..#.# ####. ..#.."),               // $
    g("##... ##..# ...#. ..#.. .#... #..## ...##"),               // %
    g(".##.. #..#. #.#.. .#... #.#.# #..#. .##.#"),               // &
    g("..#.. ..#.. .#..."),                                       // '
    g("...#. ..#.. .#... .#... .#... ..#.. ...#."),               // (
    g(".#... ..#.. ...#. ...#. ...#. ..#.. .#..."),               // )
    g("..... ..#.. #.#.# .###. #.#.# ..#.. ....."),               // *
    g("..... ..#.. ..#.. ##### ..#.. ..#.. ....."),               // +
    g("..... ..... ..... ..... ..... .##.. .##.. ..#.. .#..."),   // ,
    g("..... ..... ..... ##### ..... ..... ....."),               // -
    g("..... ..... ..... ..... ..... .##.. .##.."),               // .
    g("..... ....# ...#. ..#.. .#... #.... ....."),               // /
    g(".###. #...# #..## #.#.# ##..# #...# .###."),               // 0
    g("..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###."),               // 1
    g(".###. #...# ....# ...#. ..#.. .#... #####"),               // 2
    g("##### ...#. ..#.. ...#. ....# #...# .###."),               // 3
    g("...#. ..##. .#.#. #..#. ##### ...#. ...#."),               // 4
    g("##### #.... ####. ....# ....# #...# .###."),               // 5
    g("..##. .#... #.... ####. #...# #...# .###."),               // 6
    g("##### ....# ...#. ..#.. .#... .#... .#..."),               // 7
    g(".###. #...# #...# .###. #...# #...# .###."),               // 8
    g(".###. #...# #...# .#### ....# ...#. .##.."),               // 9
    g("..... .##.. .##.. ..... .##.. .##.. ....."),               // :
    g("..... .##.. .##.. ..... .##.. .##.. ..#.. .#..."),         // ;
    g("...#. ..#.. .#... #.... .#... ..#.. ...#."),               // <
    g("..... ..... ##### ..... ##### ..... ....."),               // =
    g(".#... ..#.. ...#. ....# ...#. ..#.. .#..."),               // >
    g(".###. #...# ....# ...#. ..#.. ..... ..#.."),               // ?
    g(".###. #...# ....# .##.# #.#.# #.#.# .###."),               // @
    g(".###. #...# #...# ##### #...# #...# #...#"),               // A
    g("####. #...# #...# ####. #...# #...# ####."),               // B
    g(".###. #...# #.... #.... #.... #...# .###."),               // C
    g("###.. #..#. #...# #...# #...# #..#. ###.."),               // D
    g("##### #.... #.... ####. #.... #.... #####"),               // E
    g("##### #.... #.... ####. #.... #.... #...."),               // F
    g(".###. #...# #.... #.### #...# #...# .####"),               // G
    g("#...# #...# #...# ##### #...# #...# #...#"),               // H
    g(".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),               // I
    g("..### ...#. ...#. ...#. ...#. #..#. .##.."),               // J
    g("#...# #..#. #.#.. ##... #.#.. #..#. #...#"),               // K
    g("#.... #.... #.... #.... #.... #.... #####"),               // L
    g("#...# ##.## #.#.# #.#.# #...# #...# #...#"),               // M
    g("#...# #...# ##..# #.#.# #..## #...# #...#"),               // N
    g(".###. #...# #...# #...# #...# #...# .###."),               // O
    g("####. #...# #...# ####. #.... #.... #...."),               // P
    g(".###. #...# #...# #...# #.#.# #..#. .##.#"),               // Q
    g("####. #...# #...# ####. #.#.. #..#. #...#"),               // R
    g(".#### #.... #.... .###. ....# ....# ####."),               // S
    g("##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),               // T
    g("#...# #...# #...# #...# #...# #...# .###."),               // U
    g("#...# #...# #...# #...# #...# .#.#. ..#.."),               // V
    g("#...# #...# #...# #.#.# #.#.# #.#.# .#.#."),               // W
    g("#...# #...# .#.#. ..#.. .#.#. #...# #...#"),               // X
    g("#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.."),               // Y
    g("##### ....# ...#. ..#.. .#... #.... #####"),               // Z
    g(".###. .#... .#... .#... .#... .#... .###."),               // [
    g("..... #.... .#... ..#.. ...#. ....# ....."),               // backslash
    g(".###. ...#. ...#. ...#. ...#. ...#. .###."),               // ]
    g("..#.. .#.#. #...#"),                                       // ^
    g("..... ..... ..... ..... ..... ..... ..... #####"),         // _
    g(".#... ..#.."),                                             // `
    g("..... ..... .###. ....# .#### #...# .####"),               // a
    g("#.... #.... #.##. ##..# #...# #...# ####."),               // b
    g("..... ..... .###. #.... #.... #...# .###."),               // c
    g("....# ....# .##.# #..## #...# #...# .####"),               // d
    g("..... ..... .###. #...# ##### #.... .###."),               // e
    g("..##. .#..# .#... ###.. .#... .#... .#..."),               // f
    g("..... ..... .#### #...# #...# #..## .##.# ....# .###."),   // g
    g("#.... #.... #.##. ##..# #...# #...# #...#"),               // h
    g("..#.. ..... .##.. ..#.. ..#.. ..#.. .###."),               // i
    g("...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##.."),   // j
    g("#.... #.... #..#. #.#.. ##... #.#.. #..#."),               // k
    g(".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###."),               // l
    g("..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#"),               // m
    g("..... ..... #.##. ##..# #...# #...# #...#"),               // n
    g("..... ..... .###. #...# #...# #...# .###."),               // o
    g("..... ..... ####. #...# #...# #...# ####. #.... #...."),   // p
    g("..... ..... .#### #...# #...# #...# .#### ....# ....#"),   // q
    g("..... ..... #.##. ##..# #.... #.... #...."),               // r
    g("..... ..... .#### #.... .###. ....# ####."),               // s
    g(".#... .#... ###.. .#... .#... .#..# ..##."),               // t
    g("..... ..... #...# #...# #...# #..## .##.#"),               // u
    g("..... ..... #...# #...# #...# .#.#. ..#.."),               // v
    g("..... ..... #...# #...# #.#.# #.#.# .#.#."),               // w
    g("..... ..... #...# .#.#. ..#.. .#.#. #...#"),               // x
    g("..... ..... #...# #...# #...# #...# .#### ....# .###."),   // y
    g("..... ..... ##### ...#. ..#.. .#... #####"),               // z
    g("...#. ..#.. ..#.. .#... ..#.. ..#.. ...#."),               // {
    g("..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."),               // |
    g(".#... ..#.. ..#.. ...#. ..#.. ..#.. .#..."),               // }
    g("..... ..... .#... #.#.# ...#. ..... ....."),               // ~
];

/// Rows of the glyph for `c`; characters outside ASCII 32..=126 draw as '?'.
pub fn glyph(c: char) -> &'static [u8; GLYPH_H as usize] {
    let b = if (FIRST as u32..=LAST as u32).contains(&(c as u32)) { c as u8 } else { b'?' };
    &GLYPHS[(b - FIRST) as usize]
}

/// Width in image pixels of `text` drawn at `scale` (no trailing gap).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

/// Height in image pixels of one line at `scale`, descenders included.
pub fn text_height(scale: u32) -> u32 {
    GLYPH_H * scale
}

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u64) < img.width() as u64 && (y as u64) < img.height() as u64 {
        img.put_pixel(x as u32, y as u32, colour);
    }
}

/// Draws `text` with its top-left corner at (x, y); each font pixel becomes a `scale` x
/// `scale` block. Pixels outside the image are clipped.
pub fn draw_text(img: &mut RgbImage, x: i32, y: i32, text: &str, colour: Rgb<u8>, scale: u32) {
    draw_glyphs(text, scale, |fx, fy| {
        let (px, py) = (x as i64 + fx, y as i64 + fy);
        put(img, px, py, colour)
    });
}

/// Draws `text` rotated a quarter turn anticlockwise (reading bottom to top), the top-left
/// corner of its bounding box at (x, y); the box is `text_height` wide, `text_width` tall.
pub fn draw_text_vertical(img: &mut RgbImage, x: i32, y: i32, text: &str, colour: Rgb<u8>, scale: u32) {
    let len = text_width(text, scale) as i64;
    draw_glyphs(text, scale, |fx, fy| {
        // Horizontal text pixel (fx, fy) -> column fy, row counted up from the box bottom.
        let (px, py) = (x as i64 + fy, y as i64 + len - 1 - fx);
        put(img, px, py, colour)
    });
}

/// Calls `plot(dx, dy)` for every inked image pixel of `text`, offsets from its top-left.
fn draw_glyphs(text: &str, scale: u32, mut plot: impl FnMut(i64, i64)) {
    let s = scale.max(1) as i64;
    for (i, c) in text.chars().enumerate() {
        let ox = i as i64 * ADVANCE as i64 * s;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_W as i64 {
                if bits & (1 << (GLYPH_W as i64 - 1 - col)) == 0 {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        plot(ox + col * s + dx, row as i64 * s + dy);
                    }
                }
            }
        }
    }
}
