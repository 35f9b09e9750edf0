import CKNet

/// A persistent dialing client (knet's TCPClient): `dialAndServe` dials, serves the
/// connection until it closes, then dials again, blocking the calling thread. Every
/// callback runs on a loop thread. All methods are thread-safe.
public final class TCPClient: Sendable {
    /// The C client (thread-safe by the C contract); freed in deinit, which can only run
    /// once no `dialAndServe` call is running, since that call keeps `self` alive.
    nonisolated(unsafe) let handle: OpaquePointer
    let current = ConnectionSlot()

    /// Creates a client that dials `address` ("host:port", "[v6]:port" or ":port", this host); retry is off.
    /// Opens no descriptor (running out of them is an error `dialAndServe` throws).
    public init(_ address: String) {
        _ = knetLoggingInstalled
        guard let handle = knet_client_new(cAddress(address)) else { fatalError("knet_client_new: out of memory") }
        self.handle = handle
    }

    deinit {
        knet_client_free(handle)
    }

    /// Retries failed dials with exponential backoff (1 s doubling to 60 s by default).
    public func enableRetry() {
        knet_client_enable_retry(handle)
    }

    /// Makes a failed dial throw its error from `dialAndServe`.
    public func disableRetry() {
        knet_client_disable_retry(handle)
    }

    /// Sets the retry backoff: first wait `initial`, doubling up to `max` (0 counts as
    /// 1 ms, a `max` below `initial` as `initial`); applies from the next failed dial.
    public func setRetryBackoff(initial: Duration, max: Duration) {
        knet_client_set_retry_backoff(handle, knetMilliseconds(initial), knetMilliseconds(max))
    }

    /// Dials and serves with `handler` and `codec` (nil = defaults), dialing again at once
    /// each time the connection ends (the backoff paces failed dials only, as in Go's
    /// knet; a connection its loop could not take counts as a failed dial). Blocks; throws
    /// `KNetError.clientClosed` after `close()`, the dial error (e.g.
    /// `.system(errno: ECONNREFUSED)`) when retry is off, `.busy` at once while another
    /// `dialAndServe` of this client runs, `.system(errno: EDEADLK)` when called from a
    /// handler callback (a loop thread: call it from a thread of your own), or
    /// `.system(errno:)` EMFILE, ENFILE, ENOMEM or EAGAIN when its wake-up descriptor or
    /// the loop threads could not be made. A dial has no timeout of its own (as in Go's
    /// knet): one that gets no answer waits out the kernel's SYN retries (about 2 minutes),
    /// and `close()` or `shutdown(timeout:)` ends it at once. In async code use
    /// `run(handler:codec:)`, which holds no thread of the task pool.
    public func dialAndServe(handler: (any TCPHandler)? = nil, codec: (any Codec)? = nil) throws {
        let rc = withExtendedLifetime(self) {
            withServeContext(handler: handler, codec: codec, clientSlot: current) { cHandler, cCodec in
                knet_client_dial_and_serve(handle, cHandler, cCodec)
            }
        }
        throw KNetError(code: rc)
    }

    /// Closes the current connection and stops dialing (does not block; callable from
    /// callbacks). Closing twice is harmless.
    public func close() {
        _ = knet_client_close(handle)
    }

    /// Graceful stop: no more dialing; the current connection is shut down as with
    /// `TCPConnection.close(timeout:)`; then `dialAndServe` throws `.clientClosed`.
    /// Does not block; a later `close()` force-closes at once.
    public func shutdown(timeout: Duration) {
        _ = knet_client_shutdown(handle, knetMilliseconds(timeout))
    }

    /// Closes a connection dialed from now on after `timeout` with no bytes either way
    /// (reason `.system(errno: ETIMEDOUT)`); nil or zero turns it off (the default).
    /// A graceful close asked for (`close(timeout:)`, `shutdown(timeout:)`) is bounded by its
    /// own timeout instead; the drain after the peer's EOF by both.
    public func setIdleTimeout(_ timeout: Duration?) {
        knet_client_set_idle_timeout(handle, timeout.map(knetMilliseconds) ?? 0)
    }

    /// Bounds the bytes queued per connection dialed from now on (default 64 MiB, 0 or
    /// negative = unlimited); a send beyond it throws `.pendingSendFull`.
    public func setMaxQueuedBytes(_ maxBytes: Int) {
        knet_client_set_max_queued_bytes(handle, max(0, maxBytes))
    }

    /// The current connection: set just before its `connect(true)`, nil again once its
    /// `connect(false)` returned (a closing connection stays current until then).
    public var connection: TCPConnection? {
        current.value.withLock { $0 }
    }
}
