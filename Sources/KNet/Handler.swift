/// Connection events of a server or client. Every callback of one connection runs on
/// that connection's loop thread, in order (`connect(true)`, every `receive`,
/// `connect(false)`), never concurrently with each other; a callback that blocks stalls
/// every connection of its loop. `connect(false)` comes exactly once for every
/// connection that got `connect(true)`.
public protocol TCPHandler: Sendable {
    /// The connection was established (`connected == true`) or has closed (`false`);
    /// runs on the connection's loop thread.
    func connect(_ conn: TCPConnection, connected: Bool)
    /// One message decoded by the codec arrived; runs on the connection's loop thread.
    /// `buf` is the handler's to keep; an array knet made holds at most 4 × its count (or
    /// 64 bytes) of capacity. A raw read of 1 KiB or more arrives in the very array it was
    /// read into (no copy) unless that array is over 4 × the read (then it is copied, and
    /// after four such reads in a row the next array is sized down); a smaller message is
    /// copied into storage reused when dropped.
    func receive(_ conn: TCPConnection, _ buf: [UInt8])
}

extension TCPHandler {
    /// Ignores connection events by default.
    public func connect(_ conn: TCPConnection, connected: Bool) {}
    /// Ignores received messages by default.
    public func receive(_ conn: TCPConnection, _ buf: [UInt8]) {}
}

/// The handler that ignores every event (knet's DefaultTCPHandler).
public struct DefaultTCPHandler: TCPHandler {
    /// Creates the handler that ignores every event.
    public init() {}
}
