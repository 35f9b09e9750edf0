// Shared test helpers: background serve calls, deadline waits, a recording handler and a
// plain-socket peer written with Glibc calls.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import Foundation
import KNet
import Synchronization
import Testing

/// Every KNet test, run one at a time so timings stay predictable on a loaded 2-core machine.
@Suite(.serialized, .timeLimit(.minutes(1)))
struct KNetTests {}

/// A value guarded by a lock. (NSLock rather than Synchronization.Mutex, which on Linux
/// uses futexes that ThreadSanitizer does not see, so `--sanitize=thread` would report races.)
final class Locked<Value: Sendable>: @unchecked Sendable {
    // `value` is only touched with `lock` held.
    private let lock = NSLock()
    private var value: Value

    init(_ value: Value) {
        self.value = value
    }

    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
@discardableResult
func eventually(_ timeout: Duration = .seconds(10), _ condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        if ContinuousClock.now >= deadline { return condition() }
        usleep(500)
    }
    return true
}

/// Runs `body` on its own thread and keeps what it threw (or nil when it returned).
final class Background: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let outcome = Locked<(any Error)??>(nil)

    init(_ body: @escaping @Sendable () throws -> Void) {
        let thread = Thread { [self] in
            do {
                try body()
                outcome.withLock { $0 = .some(nil) }
            } catch {
                outcome.withLock { $0 = .some(error) }
            }
            done.signal()
        }
        thread.start()
    }

    /// True once the body has ended (returned or thrown).
    var isFinished: Bool { outcome.withLock { $0 != nil } }

    /// Waits (bounded) for the body to end; returns what it threw, or nil when it returned
    /// normally. Records a test issue when it did not end in time.
    func join(timeout seconds: Double = 15, sourceLocation: SourceLocation = #_sourceLocation) -> (any Error)? {
        if done.wait(timeout: .now() + seconds) == .timedOut {
            Issue.record("background call did not return within \(seconds) s", sourceLocation: sourceLocation)
            return nil
        }
        return outcome.withLock { $0 ?? nil }
    }
}

/// A TCPServer on 127.0.0.1 with a kernel-chosen port, serving on a background thread.
final class ServerHarness: Sendable {
    let server: TCPServer
    let serving: Background
    let port: Int
    let recorder: RecordingHandler?

    init(handler: (any TCPHandler)?, codec: (any Codec)?) throws {
        let server = TCPServer("127.0.0.1:0")
        self.server = server
        recorder = handler as? RecordingHandler
        serving = Background { try server.listenAndServe(handler: handler, codec: codec) }
        port = try server.waitUntilListening(timeout: .seconds(10))
    }

    /// Closes the server and returns what listenAndServe threw (expected: .serverClosed);
    /// a RecordingHandler's callback contract is checked once every callback ran.
    func stop(sourceLocation: SourceLocation = #_sourceLocation) -> KNetError? {
        server.close()
        let result = serving.join() as? KNetError
        if let recorder { #expect(recorder.snapshot.contractFailures == 0, sourceLocation: sourceLocation) }
        return result
    }
}

/// A TCPClient dialing 127.0.0.1:port on a background thread.
final class ClientHarness: Sendable {
    let client: TCPClient
    let serving: Background
    let recorder: RecordingHandler?

    init(port: Int, handler: (any TCPHandler)?, codec: (any Codec)?, retry: Bool = false) {
        let client = TCPClient("127.0.0.1:\(port)")
        recorder = handler as? RecordingHandler
        if retry {
            client.enableRetry()
            client.setRetryBackoff(initial: .milliseconds(20), max: .milliseconds(100))
        } else {
            client.disableRetry()
        }
        self.client = client
        serving = Background { try client.dialAndServe(handler: handler, codec: codec) }
    }

    /// Closes the client and returns what dialAndServe threw (expected: .clientClosed);
    /// a RecordingHandler's callback contract is checked once every callback ran.
    func stop(sourceLocation: SourceLocation = #_sourceLocation) -> KNetError? {
        client.close()
        let result = serving.join() as? KNetError
        if let recorder { #expect(recorder.snapshot.contractFailures == 0, sourceLocation: sourceLocation) }
        return result
    }
}

/// Records every event of every connection it serves, checking the callback contract:
/// each callback of a connection gets the same TCPConnection object (through its
/// userdata) on the thread that ran its connect(true), never nested or concurrent, and
/// nothing follows connect(false). Violations count in `contractFailures`.
final class RecordingHandler: TCPHandler {
    struct Connection {
        var object: TCPConnection?
        var connects = 0
        var disconnects = 0
        var messages: [[UInt8]] = []
        var bytes: [UInt8] = []
        var reasonAtDisconnect: CloseReason?
        var thread = pthread_self() // the loop thread of connect(true)
        var inCallback = false
    }
    struct State {
        var connections: [Int: Connection] = [:]
        var contractFailures = 0
        var nextID = 0
    }

    let state = Locked(State())
    let echo: Bool
    let keepObjects: Bool
    let onConnect: (@Sendable (TCPConnection) -> Void)?
    let onReceive: (@Sendable (TCPConnection, [UInt8]) -> Void)?

    init(echo: Bool = false, keepObjects: Bool = true,
         onConnect: (@Sendable (TCPConnection) -> Void)? = nil,
         onReceive: (@Sendable (TCPConnection, [UInt8]) -> Void)? = nil) {
        self.echo = echo
        self.keepObjects = keepObjects
        self.onConnect = onConnect
        self.onReceive = onReceive
    }

    private func id(of conn: TCPConnection) -> Int? {
        conn.userdata as? Int
    }

    /// Checks one callback of a live record: its thread, no nesting, not after connect(false).
    private static func violates(_ record: Connection) -> Bool {
        pthread_equal(record.thread, pthread_self()) == 0 || record.inCallback || record.disconnects > 0
    }

    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            let id = state.withLock { state -> Int in
                let id = state.nextID
                state.nextID += 1
                state.connections[id] = Connection(object: keepObjects ? conn : nil, connects: 1)
                return id
            }
            conn.userdata = id
            onConnect?(conn)
        } else {
            let reason = conn.closeReason
            state.withLock { state in
                guard let id = id(of: conn), var record = state.connections[id] else {
                    state.contractFailures += 1
                    return
                }
                if keepObjects && record.object !== conn { state.contractFailures += 1 }
                if Self.violates(record) { state.contractFailures += 1 }
                record.disconnects += 1
                record.reasonAtDisconnect = reason
                state.connections[id] = record
            }
        }
    }

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        let recordID = state.withLock { state -> Int? in
            guard let id = id(of: conn), var record = state.connections[id] else {
                state.contractFailures += 1
                return nil
            }
            if keepObjects && record.object !== conn { state.contractFailures += 1 }
            if Self.violates(record) { state.contractFailures += 1 }
            record.inCallback = true
            record.messages.append(buf)
            record.bytes += buf
            state.connections[id] = record
            return id
        }
        if echo { try? conn.send(buf) }
        onReceive?(conn, buf)
        if let recordID { state.withLock { $0.connections[recordID]?.inCallback = false } }
    }

    var snapshot: State { state.withLock { $0 } }
    var connectionCount: Int { state.withLock { $0.connections.count } }
    /// The one connection's record (tests with a single connection).
    var only: Connection? { state.withLock { $0.connections.count == 1 ? $0.connections.first?.value : nil } }
    var totalMessages: Int { state.withLock { $0.connections.values.reduce(0) { $0 + $1.messages.count } } }
    var totalBytes: Int { state.withLock { $0.connections.values.reduce(0) { $0 + $1.bytes.count } } }
}

/// Sends `message` on `conn` up to `attempts` times; returns the first KNetError a send
/// threw, or nil when every send was accepted (other errors are rethrown).
func sendUntilError(_ conn: TCPConnection, _ message: [UInt8], attempts: Int) throws -> KNetError? {
    for _ in 0..<attempts {
        do { try conn.send(message) } catch let error as KNetError { return error }
    }
    return nil
}

/// A blocking plain-socket peer on 127.0.0.1 (no knet), for byte-exact control.
final class PlainSocket {
    let fd: Int32

    /// Connects to 127.0.0.1:port with TCP_NODELAY and a receive timeout.
    init(port: Int, receiveTimeoutSeconds: Int = 20) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw KNetError.system(errno: errno) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else {
            let error = errno
            Glibc.close(fd)
            throw KNetError.system(errno: error)
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var timeout = timeval(tv_sec: receiveTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Takes over an accepted socket (closed in deinit).
    init(adopting fd: Int32) { self.fd = fd }

    deinit { Glibc.close(fd) }

    /// Writes every byte (blocking).
    func write(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw KNetError.system(errno: errno)
            }
            offset += n
        }
    }

    /// Reads up to `max` bytes; [] at EOF; throws on error or receive timeout.
    func read(max: Int = 65536) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: max)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n >= 0 { return Array(buffer[0..<n]) }
            if errno == EINTR { continue }
            throw KNetError.system(errno: errno)
        }
    }

    /// Reads exactly `count` bytes (throws at an early EOF).
    func read(exactly count: Int) throws -> [UInt8] {
        var result: [UInt8] = []
        while result.count < count {
            let chunk = try read(max: count - result.count)
            if chunk.isEmpty { throw KNetError.endOfStream }
            result += chunk
        }
        return result
    }

    /// Reads until the peer's EOF, handing each chunk to `consume`.
    func readToEnd(_ consume: ([UInt8]) -> Void) throws {
        while true {
            let chunk = try read()
            if chunk.isEmpty { return }
            consume(chunk)
        }
    }

    /// Half-closes the write side.
    func shutdownWrite() { Glibc.shutdown(fd, Int32(SHUT_WR)) }
}

/// A port nothing listens on, held bound (not listening) until `release()` or deinit:
/// dials to it are refused, and no other socket (another test, or a dial's own ephemeral
/// source port, which would connect to itself) can take it meanwhile.
final class ReservedPort {
    let port: Int
    private var fd: Int32

    init() throws {
        (fd, port) = try boundSocket(listening: false)
    }

    /// Lets the port go (e.g. for a server about to listen on it).
    func release() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    deinit { release() }
}

/// A listening socket on 127.0.0.1 that never accepts: the kernel completes the
/// handshakes and buffers what arrives, so it is a peer that never reads.
final class SilentListener {
    let port: Int
    private let fd: Int32

    init() throws {
        (fd, port) = try boundSocket(listening: true)
    }

    deinit { Glibc.close(fd) }
}

/// A TCP socket bound to 127.0.0.1 on a kernel-chosen port, listening (backlog 8) when
/// asked; closed again if that fails.
private func boundSocket(listening: Bool) throws -> (fd: Int32, port: Int) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw KNetError.system(errno: errno) }
    do {
        let port = try boundPort(fd)
        if listening && listen(fd, 8) != 0 { throw KNetError.system(errno: errno) }
        return (fd, port)
    } catch {
        Glibc.close(fd)
        throw error
    }
}

/// Binds fd to 127.0.0.1 on a kernel-chosen port and returns the port.
private func boundPort(_ fd: Int32) throws -> Int {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { throw KNetError.system(errno: errno) }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// A Swift codec: 4-byte big-endian length, then the body, read in two separate reader
/// calls; it records what it saw so tests can pace a peer and check partial reads.
final class HeaderBodyCodec: Codec {
    let calls = Atomic<Int>(0)
    /// Bytes consumed by frames so far plus the bytes buffered at the latest call.
    let observed = Atomic<Int>(0)
    let consumed = Atomic<Int>(0)
    let rejectLengthAbove: UInt32

    init(rejectLengthAbove: UInt32 = 1 << 20) {
        self.rejectLengthAbove = rejectLengthAbove
    }

    struct FrameTooLarge: Error {}

    func read(from reader: inout ByteReader) throws -> [UInt8] {
        calls.add(1, ordering: .relaxed)
        observed.store(consumed.load(ordering: .relaxed) + reader.readableBytes, ordering: .relaxed)
        let length = try reader.readInteger(as: UInt32.self)
        guard length <= rejectLengthAbove else { throw FrameTooLarge() }
        let body = try reader.readBytes(Int(length))
        consumed.add(4 + Int(length), ordering: .relaxed)
        return body
    }

    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeInteger(UInt32(message.count))
        writer.writeBytes(message)
    }
}

/// Bytes 0, 1, 2, ... wrapping at 251 (a prime, so chunk boundaries show up as mismatches).
func pattern(_ count: Int, offset: Int = 0) -> [UInt8] {
    var result: [UInt8] = []
    result.reserveCapacity(count)
    var start = offset % 251
    while result.count < count {
        let take = Swift.min(251 - start, count - result.count)
        result += patternCycle[start..<start + take]
        start = 0
    }
    return result
}

private let patternCycle: [UInt8] = (0..<251).map { UInt8($0) }
