import CKNet

/// A listening TCP server. `listenAndServe` blocks the calling thread; every callback
/// runs on a loop thread, never on that thread. All methods are thread-safe.
public final class TCPServer: Sendable {
    /// The C server (thread-safe by the C contract); freed in deinit, which can only run
    /// once no `listenAndServe` call is running, since that call keeps `self` alive.
    nonisolated(unsafe) let handle: OpaquePointer

    /// Creates a server for `address`: "host:port", "[v6]:port", ":port" (every interface)
    /// or "" (a kernel-chosen port). The address is checked by `listenAndServe`.
    public init(_ address: String) {
        _ = knetLoggingInstalled
        guard let handle = knet_server_new(cAddress(address)) else { fatalError("knet_server_new: out of memory") }
        self.handle = handle
    }

    deinit {
        knet_server_free(handle)
    }

    /// Listens and serves every accepted connection with `handler` and `codec` (nil =
    /// `DefaultTCPHandler` / `DefaultCodec`). Blocks until the server is closed and every
    /// connection has delivered `connect(false)`, then throws `KNetError.serverClosed`;
    /// throws another error at once when it cannot listen (`.invalidAddress`,
    /// `.resolveFailed`, `.system(errno: EADDRINUSE)`, `.busy` if already serving,
    /// `.system(errno: EDEADLK)` when called from a handler callback (a loop thread), ...).
    /// In async code use `run(handler:codec:)`, which holds no thread of the task pool.
    public func listenAndServe(handler: (any TCPHandler)? = nil, codec: (any Codec)? = nil) throws {
        let rc = withExtendedLifetime(self) {
            withServeContext(handler: handler, codec: codec, clientSlot: nil) { cHandler, cCodec in
                knet_server_listen_and_serve(handle, cHandler, cCodec)
            }
        }
        throw KNetError(code: rc)
    }

    /// Stops accepting and closes every connection at once (does not block; callable from
    /// callbacks); from then on the port refuses connections and `send` on its connections
    /// throws `.connectionClosed` (also after `shutdown(timeout:)`). Closing twice is
    /// harmless.
    public func close() {
        _ = knet_server_close(handle)
    }

    /// Graceful stop: stops accepting, shuts every connection down gracefully (queued bytes
    /// written, FIN, wait for the peer to close) and force-closes what remains after
    /// `timeout` (also those already closing gracefully with a later deadline); then
    /// `listenAndServe` throws `.serverClosed`. Does not block; a later `close()`
    /// force-closes at once.
    public func shutdown(timeout: Duration) {
        _ = knet_server_shutdown(handle, knetMilliseconds(timeout))
    }

    /// Limits the connections served at once: beyond `maxConnections` a new connection is
    /// closed at once and counted as refused (0 = unlimited, the default). Set it before
    /// `listenAndServe`.
    public func setMaxConnections(_ maxConnections: Int) {
        knet_server_set_max_conns(handle, max(0, maxConnections))
    }

    /// Closes connections accepted from now on that have had no bytes either way for
    /// `timeout` (reason `.system(errno: ETIMEDOUT)`); nil or zero turns it off (the default).
    /// A graceful close asked for (`close(timeout:)`, `shutdown(timeout:)`) is bounded by its
    /// own timeout instead; the drain after the peer's EOF by both.
    public func setIdleTimeout(_ timeout: Duration?) {
        knet_server_set_idle_timeout(handle, timeout.map(knetMilliseconds) ?? 0)
    }

    /// Bounds the bytes queued per connection accepted from now on (default 64 MiB,
    /// 0 or negative = unlimited); a send beyond it throws `.pendingSendFull`.
    public func setMaxQueuedBytes(_ maxBytes: Int) {
        knet_server_set_max_queued_bytes(handle, max(0, maxBytes))
    }

    /// The server's counters.
    public var stats: ServerStats {
        var raw = knet_stats()
        knet_server_stats(handle, &raw)
        return ServerStats(live: raw.live, accepted: raw.accepted, refused: raw.refused,
                           idleClosed: raw.idle_closed, bytesIn: raw.bytes_in, bytesOut: raw.bytes_out)
    }

    /// The bound port once listening (useful with port 0; still after a close), or 0
    /// before listening or when listening failed.
    public var port: Int {
        Int(max(0, knet_server_port(handle)))
    }

    /// Blocks until the server listens and returns its port; throws the listen error of
    /// the latest `listenAndServe` (a wait begun before a retried call started sees the
    /// earlier failure), `.serverClosed` when it was closed before it listened, or
    /// `.system(errno: ETIMEDOUT)` after `timeout`. In a handler callback it may only time
    /// out (and stalls that loop meanwhile): the listener may be waiting for that very loop.
    @discardableResult
    public func waitUntilListening(timeout: Duration) throws -> Int {
        let rc = knet_server_wait_listening(handle, knetMilliseconds(timeout))
        if rc < 0 { throw KNetError(code: rc) }
        return Int(rc)
    }
}

/// The address as the C core gets it: one with an embedded NUL would reach it cut short
/// at the NUL (a valid address, maybe), so it gets one it rejects with `KNET_EADDR`.
func cAddress(_ address: String) -> String {
    address.utf8.contains(0) ? "[" : address
}

/// A server's counters (monotonic totals, except `live`).
public struct ServerStats: Hashable, Sendable {
    /// Connections open now.
    public var live: UInt64
    /// Connections accepted in total.
    public var accepted: UInt64
    /// Connections closed at once by the connection limit.
    public var refused: UInt64
    /// Connections closed by the idle timeout.
    public var idleClosed: UInt64
    /// Bytes read from all connections.
    public var bytesIn: UInt64
    /// Bytes written to all connections.
    public var bytesOut: UInt64
}
