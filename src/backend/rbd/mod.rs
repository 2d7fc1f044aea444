//! Ceph RBD backend (`--rbd POOL/IMAGE`), through librbd loaded at run time. Not implemented
//! yet.

use std::path::Path;
use std::sync::Arc;

use super::BackendError;
use crate::blk::Backend;

pub fn open(
    pool: &str,
    image: &str,
    _conf: &Path,
    _user: &str,
    _keyring: Option<&Path>,
    _read_only: bool,
) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::Unsupported(format!(
        "rbd backend ({pool}/{image}): not implemented yet"
    )))
}
