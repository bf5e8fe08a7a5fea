//! Guest storage shared by Ferry's backends (the sim guest, KVM, Xen's block back-end):
//! raw, sparse disk images with a dirty-block log, generation metadata for incremental
//! migration back, and post-copy owed blocks; plus the initial content of new guests, and
//! an NBD block back-end ([`nbd`], [`kernel_nbd`]) through which a hypervisor's guest does
//! its disk I/O while Ferry logs every write.

pub mod content;
pub mod image;
pub mod kernel_nbd;
pub mod nbd;
pub mod recovery;
pub mod set;

pub use content::{prefill_disk, random_bytes, Fill};
pub use image::DiskImage;
pub use recovery::ImageSource;
pub use set::{DiskSpec, GuestDisks};
