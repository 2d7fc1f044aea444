//! NBD client backend (`--nbd URI`): a native client on the reactors' io_uring. Not
//! implemented yet.

use std::sync::Arc;
use std::time::Duration;

use super::BackendError;
use crate::blk::Backend;

pub fn open(
    uri: &str,
    _timeout: Duration,
    _read_only: bool,
) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::Unsupported(format!(
        "nbd backend ({uri}): not implemented yet"
    )))
}
