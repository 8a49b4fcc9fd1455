//! x16 bilinear upsampling with align_corners = true (the mask head's last step).
//! Owned by the decoder work; see `upsample_bilinear_ac`.
