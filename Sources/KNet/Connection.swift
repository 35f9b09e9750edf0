import CKNet

/// One TCP connection. The same object is passed to every callback of the connection,
/// so `===` and `userdata` work across them. Its methods may be called from any thread,
/// also from inside callbacks. It stays valid when kept past `connect(false)`; sends then
/// throw `KNetError.connectionClosed`.
public final class TCPConnection: Sendable {
    // The fields a message uses come first, in the 128 bytes the C core prefetches at
    // its userdata before each read: with many connections this object is cold.

    /// The retained C connection (thread-safe by the C contract).
    @usableFromInline nonisolated(unsafe) let handle: OpaquePointer
    /// The scratch slot of the loop thread that runs this connection's callbacks; only the
    /// receive path uses it, on that thread (so no per-message thread-local lookup).
    nonisolated(unsafe) let loopSlot: ThreadSlot
    /// The serve call's handler. Owned by the serve call's `ServeContext`, which outlives
    /// every callback; only callbacks use it (never after `connect(false)`). Unowned, so
    /// a handler that keeps its connections forms no cycle, and a message pays no retain.
    let handler: Unmanaged<HandlerBox>
    /// True when a Swift codec frames this connection's messages.
    @usableFromInline let swiftCodec: Bool
    /// True for the raw codec: a message is one read, into the slot's spare array.
    let rawCodec: Bool
    /// Keeps the codec's storage alive while this object can send through it.
    let codecOwner: (any AnyObject & Sendable)?
    /// Guards `userdataValue` (a pthread mutex, so ThreadSanitizer sees it).
    private let userdataLock = PThreadMutex()
    nonisolated(unsafe) private var userdataValue: (any Sendable)?
    /// Set (under the lock) once `connect(false)` returned: userdata is no longer kept.
    nonisolated(unsafe) private var userdataDropped = false
    /// The `whenDrained` body waiting to run (under `userdataLock`; dropped with userdata),
    /// and its request's number: a notification of an earlier request, already under way
    /// when a later one was made, must not run the later body (its queue may not be empty).
    nonisolated(unsafe) private var drainedBody: (@Sendable (TCPConnection) -> Void)?
    nonisolated(unsafe) private var drainedRequest: UInt = 0

    init(handle: OpaquePointer, loopSlot: ThreadSlot, handler: Unmanaged<HandlerBox>, swiftCodec: Bool,
         rawCodec: Bool, codecOwner: (any AnyObject & Sendable)?) {
        knet_conn_retain(handle)
        self.handle = handle
        self.loopSlot = loopSlot
        self.handler = handler
        self.swiftCodec = swiftCodec
        self.rawCodec = rawCodec
        self.codecOwner = codecOwner
    }

    deinit {
        knet_conn_release(handle)
        userdataLock.destroy()
    }

    /// Frames and queues a copy of `bytes` for sending (thread-safe). Throws
    /// `.pendingSendFull` at the pending-send or queued-bytes limit, `.connectionClosed`
    /// after close or shutdown began, the codec's `KNetError` (any other error it throws
    /// becomes `.codec`), or `.system` when a send on the connection's own loop thread
    /// wrote at once and the socket failed (the connection then closes).
    @inlinable
    public func send(_ bytes: [UInt8]) throws {
        if swiftCodec { return try sendThroughSwiftCodec(bytes) }
        let rc = bytes.withUnsafeBytes { knet_conn_send(handle, $0.baseAddress, $0.count) }
        if rc != 0 { throw KNetError(code: rc) }
    }

    /// Frames and queues a copy of the bytes in `buffer` for sending (thread-safe).
    @inlinable
    public func send(_ buffer: UnsafeRawBufferPointer) throws {
        let rc = knet_conn_send(handle, buffer.baseAddress, buffer.count)
        if rc != 0 { throw KNetError(code: rc) }
    }

    /// Frames and queues a copy of any byte sequence (thread-safe). Contiguous ones
    /// (`ArraySlice`, `ContiguousArray`, ...) are read in place by the raw and C codecs;
    /// a Swift codec gets them as a new `[UInt8]`, as it gets any non-array sequence.
    @inlinable
    public func send<Bytes: Sequence>(_ bytes: Bytes) throws where Bytes.Element == UInt8 {
        let done: Void? = try bytes.withContiguousStorageIfAvailable { try send(UnsafeRawBufferPointer($0)) }
        if done == nil { try send(Array(bytes)) }
    }

    /// Sends through a Swift codec, handing it this very array instead of a copy.
    @usableFromInline
    func sendThroughSwiftCodec(_ bytes: [UInt8]) throws {
        let slot = ThreadSlot.current
        let rc: Int32 = bytes.withUnsafeBytes { raw in
            slot.outgoing = bytes
            slot.outgoingBase = raw.baseAddress
            defer {
                slot.outgoing = nil
                slot.outgoingBase = nil
            }
            return knet_conn_send(handle, raw.baseAddress, raw.count)
        }
        if rc != 0 { throw KNetError(code: rc) }
    }

    /// Limits the messages queued and not yet written (0 or negative = unlimited, the
    /// default). A message leaves the count once the queue block (4 to 64 KiB) holding
    /// its last byte is written.
    public func setPendingSend(_ maxMessages: Int) {
        knet_conn_set_pending_send(handle, maxMessages < 0 ? 0 : maxMessages)
    }

    /// Bounds the bytes queued and not yet written (0 or negative = unlimited; the default
    /// comes from the server or client, 64 MiB unless set there): a send beyond it throws
    /// `.pendingSendFull`; one message is always accepted into an empty queue.
    public func setMaxQueuedBytes(_ maxBytes: Int) {
        knet_conn_set_max_queued_bytes(handle, maxBytes < 0 ? 0 : maxBytes)
    }

    /// Sets TCP_NODELAY (on by default). Throws `.connectionClosed` or a system error.
    public func setNoDelay(_ on: Bool) throws {
        let rc = knet_conn_set_nodelay(handle, on)
        if rc != 0 { throw KNetError(code: rc) }
    }

    /// Graceful close with the default 3 s timeout (see `close(timeout:)`).
    public func shutdown() {
        knet_conn_shutdown(handle)
    }

    /// Graceful close: refuses new sends, writes every queued byte, half-closes, keeps
    /// delivering what the peer sends until it closes, and force-closes after `timeout`.
    /// Asked again (or by a server or client shutdown) while under way, the earlier
    /// deadline holds.
    public func close(timeout: Duration) {
        knet_conn_close_with_timeout(handle, knetMilliseconds(timeout))
    }

    /// Stops reading (thread-safe): no more `receive` until `resumeReading()`, and once the
    /// kernel's buffers fill, TCP holds the peer back. Called in `receive`, the rest of that
    /// read is kept for the resume, never dropped. While paused the peer's close is seen
    /// only after the resume, the idle timeout still runs, and a graceful close reads on.
    public func pauseReading() {
        _ = knet_conn_pause_read(handle)
    }

    /// Reads again after `pauseReading()` (thread-safe): what was kept back is delivered
    /// first, in `receive` on the loop thread.
    public func resumeReading() {
        _ = knet_conn_resume_read(handle)
    }

    /// Runs `body` once on the connection's loop thread when everything queued for it has
    /// been written to the socket (at the loop's next turn if nothing is queued). With
    /// `pauseReading()` this is how a relay slows its source to its reader: pause the source
    /// when a send throws `.pendingSendFull`, resend and resume it here. A later call
    /// replaces a body not yet run. Throws `.connectionClosed` once a close or graceful close
    /// began; a body waiting then never runs (`connect(false)` comes instead).
    public func whenDrained(_ body: @escaping @Sendable (TCPConnection) -> Void) throws {
        var old: (@Sendable (TCPConnection) -> Void)? = body
        // Under the lock, so requests reach the C core in the order of their numbers (the
        // notification takes the lock only after the core's own lock is released). Refused
        // (closing), the body waits unrun until connect(false) drops it with the userdata.
        let rc: Int32 = userdataLock.withLock {
            if !userdataDropped { swap(&drainedBody, &old) }
            drainedRequest &+= 1
            return knet_conn_notify_drained(handle, drainedShim, UnsafeMutableRawPointer(bitPattern: drainedRequest))
        }
        if rc != 0 { throw KNetError(code: rc) }
    }

    /// Takes the body of `whenDrained` request number `request`, if it still waits (the
    /// loop thread, from the C notification).
    func takeDrainedBody(request: UInt) -> (@Sendable (TCPConnection) -> Void)? {
        var body: (@Sendable (TCPConnection) -> Void)? = nil
        userdataLock.withLock { if drainedRequest == request { swap(&drainedBody, &body) } }
        return body
    }

    /// Closes at once: queued and unread bytes are dropped. `connect(false)` follows on
    /// the loop thread (after the current callback, when called from one).
    public func close() {
        knet_conn_close(handle)
    }

    /// The local address as "ip:port" ("[v6]:port", "[v6%zone]:port" when scoped); nil if it
    /// could not be read, or once the connection has closed unless it was read while open
    /// (read it in `connect(true)` to have it in `connect(false)`).
    public var localAddress: String? {
        address { knet_conn_local_addr(handle, $0, $1) }
    }

    /// The peer address as "ip:port" ("[v6]:port", "[v6%zone]:port" when scoped), or nil
    /// when it is not known.
    public var remoteAddress: String? {
        address { knet_conn_remote_addr(handle, $0, $1) }
    }

    private func address(_ fetch: (UnsafeMutablePointer<CChar>, Int) -> Int32) -> String? {
        withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64 /* KNET_ADDRSTRLEN */) { buf in
            guard let base = buf.baseAddress, fetch(base, buf.count) >= 0 else { return nil }
            return String(cString: base)
        }
    }

    /// Any value the application attaches to this connection (thread-safe). Cleared once
    /// `connect(false)` returns and not kept when set after that (it reads nil), so a
    /// value that keeps its connection forms no reference cycle with it.
    public var userdata: (any Sendable)? {
        get { userdataLock.withLock { userdataValue } }
        set {
            var value = newValue
            userdataLock.withLock { if !userdataDropped { swap(&userdataValue, &value) } }
            // The old value (or the refused one) goes here, outside the lock: its `deinit`
            // may use this connection, userdata included.
        }
    }

    /// Drops the userdata for good, after `connect(false)` (the connection's last callback).
    func dropUserdata() {
        var value: (any Sendable)? = nil
        var body: (@Sendable (TCPConnection) -> Void)? = nil
        userdataLock.withLock {
            userdataDropped = true
            swap(&userdataValue, &value)
            swap(&drainedBody, &body)
        }
    }

    /// Why the connection closed, or `.open` while it is open.
    public var closeReason: CloseReason {
        let rc = knet_conn_close_reason(handle)
        switch rc {
        case 1: return .open
        case 0: return .local
        default: return .error(KNetError(code: rc))
        }
    }
}

extension TCPConnection: CustomReflectable {
    /// What `dump` and test failures show: the addresses and the close reason. The
    /// stored fields are not reflected: the handler reference is unowned and may be
    /// gone once the connection is kept past its serve call.
    public var customMirror: Mirror {
        Mirror(self, children: ["localAddress": localAddress as Any,
                                "remoteAddress": remoteAddress as Any,
                                "closeReason": closeReason],
               displayStyle: .class)
    }
}
