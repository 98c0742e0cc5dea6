//! twinfs FUSE layer.
