//! What the crate's kernels are launched with, as plain values: for the mask upsampling
//! (`kernels/mask_upsample.cu`) kernel names, grids, blocks, shared memory and the tap-table
//! size; for the row and element-wise kernels of `kernels/fused.cu` their grids and blocks. The
//! CUDA launchers use them, and so does the CPU emulation of the kernels (`tests/kernel_emu`),
//! which therefore runs the very launches a GPU gets.

use candle_core::{bail, DType, Result};

use super::{DwGeom, Epilogue};

/// Threads per block of every upsampling kernel.
pub const UPSAMPLE_THREADS: u32 = 256;
/// Most low-res columns a backward block owns (one thread each in its second pass).
pub const BWD_MAX_TILE: usize = UPSAMPLE_THREADS as usize;
/// Shared memory a backward block may use (the default limit without opting in).
pub const BWD_SMEM_LIMIT: usize = 48 * 1024;

/// Plane geometry: `planes` low-res (h, w) images upsampled by `factor`.
#[derive(Clone, Copy, Debug)]
pub struct UpsampleDims {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub factor: usize,
}

impl UpsampleDims {
    pub fn ho(&self) -> usize {
        self.h * self.factor
    }
    pub fn wo(&self) -> usize {
        self.w * self.factor
    }
}

/// A kernel launch as CUDA takes it: grid and block (x, y, z), dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// A row kernel of `kernels/fused.cu` over `rows` rows of `n`: one block per row, about four
/// elements per thread, 32 to 256 threads (whole warps: its reductions shuffle across full warps).
pub fn row_launch(rows: usize, n: usize) -> Result<Launch> {
    if n == 0 || rows == 0 {
        bail!("fused row kernel: empty input ({rows} rows of {n})");
    }
    let threads = n.div_ceil(4).next_multiple_of(32).clamp(32, 256) as u32;
    Ok(Launch { grid: (grid_dim(rows, "rows")?, 1, 1), block: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// A grid-stride element-wise launch over `n` elements.
pub fn elementwise_launch(n: usize) -> Launch {
    let blocks = n.div_ceil(256).clamp(1, 65_536) as u32;
    Launch { grid: (blocks, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Threads of a depthwise kernel-gradient block, and the (b, oy, ox) elements each block should
/// get at least: enough blocks to fill the card for a few hundred channels, few enough partials.
const DW_WEIGHT_THREADS: u32 = 256;
const DW_WEIGHT_ELEMS_PER_BLOCK: i64 = 8192;

/// The partial-sum launch of the depthwise kernel gradient (`kernels/depthwise.cu`): one block
/// per (channel, tap) and split of the (b, oy, ox) elements; returns it with the split count.
pub fn depthwise_weight_launch(g: &DwGeom) -> Result<(Launch, i64)> {
    let taps = g.c * g.k * g.k;
    let splits = (g.b * g.ho * g.wo / DW_WEIGHT_ELEMS_PER_BLOCK).clamp(1, 64);
    let (Ok(grid_x), Ok(grid_y)) = (i32::try_from(taps).map(|v| v as u32), u32::try_from(splits)) else {
        bail!("depthwise kernel gradient: {taps} taps x {splits} splits exceed the grid");
    };
    Ok((Launch { grid: (grid_x, grid_y, 1), block: (DW_WEIGHT_THREADS, 1, 1), shared_mem_bytes: 0 }, splits))
}

/// Per-axis source step, computed exactly as `Taps::new` does on the CPU.
pub fn axis_scale(n_in: usize, n_out: usize) -> f64 {
    if n_out > 1 {
        (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
    } else {
        0.0
    }
}

pub(crate) fn dtype_tag(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        other => bail!("mask upsample kernel: unsupported dtype {other:?}"),
    })
}

fn grid_dim(n: usize, what: &str) -> Result<u32> {
    match u32::try_from(n) {
        Ok(v) if v > 0 => Ok(v),
        _ => bail!("mask upsample kernel: {what} {n} out of range"),
    }
}

/// The kernels count rows and columns in i32 and step past the last by up to a grid's worth,
/// so an output side stays well inside i32.
fn check_sides(d: UpsampleDims) -> Result<()> {
    if d.ho().max(d.wo()) > 1 << 30 {
        bail!("mask upsample kernel: output of {} x {} exceeds 2^30 a side", d.ho(), d.wo());
    }
    Ok(())
}

/// The forward kernel for one input dtype and epilogue.
#[derive(Clone, Debug)]
pub struct UpsampleFwdPlan {
    pub name: String,
    /// Output columns per thread (the kernel's V).
    pub per_thread: usize,
    pub launch: Launch,
}

/// Forward: one vector store per thread and row when rows split into whole vectors (16 bytes,
/// 8 for the u8 mask: FWD2 in the kernel file), else one element per thread. Blocks are
/// (columns x rows) of 256 threads; each thread writes a few rows, so that its column taps
/// serve them all, while the grid still holds about half a million threads.
pub fn upsample_fwd_plan(d: UpsampleDims, input: DType, ep: Epilogue) -> Result<UpsampleFwdPlan> {
    check_sides(d)?;
    let tag = dtype_tag(input)?;
    let out_dt = ep.out_dtype(input);
    let root = match ep {
        Epilogue::Logits | Epilogue::LogitsWide => format!("mask_up_{tag}_{}", dtype_tag(out_dt)?),
        Epilogue::Sigmoid => format!("mask_up_sigmoid_{tag}"),
        Epilogue::Threshold(_) => format!("mask_up_mask_{tag}"),
    };
    let vec = (16 / out_dt.size_in_bytes()).min(8);
    let (name, per_thread) = if d.wo().is_multiple_of(vec) { (root + "_v", vec) } else { (root + "_s", 1) };
    let (chunks, rows) = (d.wo() / per_thread, d.ho());
    let bx = chunks.next_power_of_two().min(UPSAMPLE_THREADS as usize);
    let by = UPSAMPLE_THREADS as usize / bx;
    let col_blocks = chunks.div_ceil(bx);
    let rows_per_thread = (col_blocks * bx * rows * d.planes / (1 << 19)).clamp(1, 16);
    let launch = Launch {
        grid: (
            grid_dim(col_blocks, "column blocks")?,
            grid_dim(rows.div_ceil(by * rows_per_thread).min(65_535), "row blocks")?,
            grid_dim(d.planes.min(65_535), "planes")?,
        ),
        block: (bx as u32, by as u32, 1),
        shared_mem_bytes: 0,
    };
    Ok(UpsampleFwdPlan { name, per_thread, launch })
}

/// Bytes of the accumulation type: f64 for f64 data, f32 otherwise.
pub fn acc_bytes(dtype: DType) -> usize {
    if dtype == DType::F64 {
        8
    } else {
        4
    }
}

/// Shared memory of a backward block whose widest tile spans `span` output columns.
pub fn bwd_smem_bytes(dtype: DType, span: usize) -> usize {
    span * acc_bytes(dtype)
}

/// Bytes of one axis's tap table (`axis_table` in the kernel file: first taps and two weights
/// per output index, a footprint per input index, each array 16-byte aligned).
fn axis_table_bytes(n_in: usize, n_out: usize, acc: usize) -> usize {
    let a16 = |n: usize| n.div_ceil(16) * 16;
    a16(4 * n_out) + 2 * a16(acc * n_out) + 2 * a16(4 * n_in)
}

/// The backward's two launches: the tap tables (`taps_name`, into a `table_bytes` buffer),
/// then the gather (`name`), whose block owns `tile` low-res columns of one row.
#[derive(Clone, Debug)]
pub struct UpsampleBwdPlan {
    pub taps_name: &'static str,
    pub taps: Launch,
    pub table_bytes: usize,
    pub name: String,
    pub launch: Launch,
    pub tile: usize,
}

/// `span` is the widest range of output columns any `tile`-column tile reads (from the CPU
/// taps, `nn::upsample`).
pub fn upsample_bwd_plan(d: UpsampleDims, dtype: DType, tile: usize, span: usize) -> Result<UpsampleBwdPlan> {
    check_sides(d)?;
    let smem = bwd_smem_bytes(dtype, span);
    if smem > BWD_SMEM_LIMIT || tile == 0 || tile > BWD_MAX_TILE.min(d.w) {
        bail!("mask upsample grad kernel: tile {tile} spanning {span} columns ({smem} bytes of shared memory)");
    }
    let acc = acc_bytes(dtype);
    let threads = UPSAMPLE_THREADS as usize;
    Ok(UpsampleBwdPlan {
        taps_name: if acc == 8 { "mask_up_taps_f64" } else { "mask_up_taps_f32" },
        taps: Launch {
            grid: (grid_dim(d.ho().max(d.wo()).div_ceil(threads), "tap blocks")?, 1, 1),
            block: (UPSAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        table_bytes: axis_table_bytes(d.h, d.ho(), acc) + axis_table_bytes(d.w, d.wo(), acc),
        name: format!("mask_up_grad_{}", dtype_tag(dtype)?),
        launch: Launch {
            grid: (
                grid_dim(d.w.div_ceil(tile), "tiles")?,
                grid_dim(d.h.min(65_535), "rows")?,
                grid_dim(d.planes.min(65_535), "planes")?,
            ),
            block: (UPSAMPLE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        tile,
    })
}
