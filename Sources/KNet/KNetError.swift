import CKNet

/// An error reported by knet: one of knet's own conditions or a system `errno`.
public enum KNetError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The server was closed on purpose (`TCPServer.listenAndServe` after `close()`).
    case serverClosed
    /// The client was closed on purpose (`TCPClient.dialAndServe` after `close()`).
    case clientClosed
    /// The connection's pending-send limit (`setPendingSend`) or queued-bytes limit
    /// (`setMaxQueuedBytes`) is reached.
    case pendingSendFull
    /// The connection is closed or shutting down, so it takes no more sends.
    case connectionClosed
    /// The address string cannot be parsed.
    case invalidAddress
    /// The host name could not be resolved.
    case resolveFailed
    /// The codec rejected a frame (bad or oversized).
    case codec
    /// The peer closed the connection.
    case endOfStream
    /// Already serving, or too late to change this setting.
    case busy
    /// A system error, with its `errno` value.
    case system(errno: Int32)

    /// Creates the error for a negative knet error code (a knet code or `-errno`).
    @inlinable
    public init(code: Int32) {
        switch code {
        case KNET_ESERVERCLOSED: self = .serverClosed
        case KNET_ECLIENTCLOSED: self = .clientClosed
        case KNET_EPENDINGFULL: self = .pendingSendFull
        case KNET_ECLOSED: self = .connectionClosed
        case KNET_EADDR: self = .invalidAddress
        case KNET_ERESOLVE: self = .resolveFailed
        case KNET_ECODEC: self = .codec
        case KNET_EOF: self = .endOfStream
        case KNET_EBUSY: self = .busy
        default: self = .system(errno: code < 0 ? 0 &- code : code) // Int32.min: no trap
        }
    }

    /// The C error code of this error (negative; `-errno` for system errors).
    public var code: Int32 {
        switch self {
        case .serverClosed: return KNET_ESERVERCLOSED
        case .clientClosed: return KNET_ECLIENTCLOSED
        case .pendingSendFull: return KNET_EPENDINGFULL
        case .connectionClosed: return KNET_ECLOSED
        case .invalidAddress: return KNET_EADDR
        case .resolveFailed: return KNET_ERESOLVE
        case .codec: return KNET_ECODEC
        case .endOfStream: return KNET_EOF
        case .busy: return KNET_EBUSY
        case .system(let errno): return 0 &- errno // Int32.min stays negative, no trap
        }
    }

    /// A human-readable description (knet_strerror).
    public var description: String {
        guard let text = knet_strerror(code) else { return "knet error \(code)" }
        return String(cString: text)
    }
}

/// Why a connection closed, as reported by `TCPConnection.closeReason`.
public enum CloseReason: Hashable, Sendable {
    /// The connection is still open.
    case open
    /// This side closed it (`close()`, `shutdown()` or `close(timeout:)` completed normally).
    case local
    /// It closed because of this condition (peer EOF, reset, codec error, graceful-close
    /// timeout as `.system(errno: ETIMEDOUT)`, server or client closed, ...).
    case error(KNetError)
}

/// Converts a timeout to whole milliseconds, rounding a sub-millisecond rest up and
/// clamping to what the C API takes.
@usableFromInline
func knetMilliseconds(_ duration: Duration) -> UInt32 {
    let (seconds, attoseconds) = duration.components
    if seconds < 0 || (seconds == 0 && attoseconds <= 0) { return 0 }
    if seconds >= Int64(UInt32.max / 1000) { return UInt32.max }
    let attoPerMs: Int64 = 1_000_000_000_000_000
    let ms = seconds * 1000 + attoseconds / attoPerMs + (attoseconds % attoPerMs > 0 ? 1 : 0)
    return UInt32(min(ms, Int64(UInt32.max)))
}
