//! Helpers shared by the handler modules' unit tests.

/// Runs `future` to completion on a fresh single-threaded runtime with IO and
/// timers enabled, as the handlers' async code expects.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(e) => panic!("runtime: {e}"),
    }
}
