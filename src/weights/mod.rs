//! Checkpoint I/O: hub resolution, sharded safetensors, PyTorch `.pth`, the authors' release
//! layout and the project's own checkpoint format.

pub mod checked;
pub mod checkpoint;
pub mod hub;
pub mod pth;
mod pth_map;
pub mod shards;
