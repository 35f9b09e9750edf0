// The persistent TCPClient against a server that comes and goes on one port: one
// connection per cycle, connect(true)/connect(false) alternating, `connection` nil while
// it is down, sends on an ended connection refused; close and shutdown at every stage.
#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// 127.0.0.1 on a kernel-chosen port, bound (not listening) with SO_REUSEADDR, so a
/// TCPServer (which sets SO_REUSEADDR too) can listen on the port while this keeps it
/// from anyone else between servers.
private final class PortHolder {
    let port: Int
    private let fd: Int32

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw KNetError.system(errno: errno) }
        self.fd = fd
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            let error = KNetError.system(errno: errno)
            Glibc.close(fd)
            throw error
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit { Glibc.close(fd) }
}

/// Counts the client's connect events and checks they alternate (true, false, true...).
private final class AlternationHandler: TCPHandler {
    struct State {
        var up = false
        var ups = 0
        var downs = 0
        var failures = 0
        var last: TCPConnection?
    }
    let state = Locked(State())
    let onDown: (@Sendable () -> Void)?

    init(onDown: (@Sendable () -> Void)? = nil) { self.onDown = onDown }

    func connect(_ conn: TCPConnection, connected: Bool) {
        state.withLock { state in
            if state.up == connected { state.failures += 1 }
            state.up = connected
            if connected {
                state.ups += 1
                state.last = conn
            } else {
                state.downs += 1
            }
        }
        if !connected { onDown?() }
    }

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {}

    var snapshot: State { state.withLock { $0 } }
}

extension KNetTests {
    @Test("a TCPServer flapping on one port: one connection per cycle, alternating, `connection` nil while down")
    func flappingServer() throws {
        let holder = try PortHolder()
        let handler = AlternationHandler()
        let client = TCPClient("127.0.0.1:\(holder.port)")
        client.enableRetry()
        client.setRetryBackoff(initial: .milliseconds(2), max: .milliseconds(20))
        let serving = Background { try client.dialAndServe(handler: handler, codec: nil) }
        var previous: TCPConnection?
        for _ in 1...20 {
            let server = TCPServer("127.0.0.1:\(holder.port)")
            let listening = Background { try server.listenAndServe(handler: nil, codec: nil) }
            #expect(try server.waitUntilListening(timeout: .seconds(10)) == holder.port)
            #expect(eventually { handler.snapshot.up && client.connection != nil })
            let current = try #require(client.connection)
            try current.send([1, 2, 3])
            if let previous {
                #expect(previous !== current)
                #expect(throws: KNetError.connectionClosed) { try previous.send([9]) }
            }
            previous = current
            server.close()
            #expect(listening.join() as? KNetError == .serverClosed)
            // A re-dial can reach the closing listener's backlog before its descriptor is
            // closed (then it is reset): wait until every connection is down.
            #expect(eventually { let s = handler.snapshot; return !s.up && s.ups == s.downs })
            // Nothing listens: no new connection yet. Awaited, not read once: `connection`
            // turns nil once connect(false) returned, a moment after the handler saw it.
            #expect(eventually { client.connection == nil })
        }
        client.close()
        #expect(serving.join() as? KNetError == .clientClosed)
        let state = handler.snapshot
        #expect(state.ups >= 20 && state.ups == state.downs && state.failures == 0)
        #expect(client.connection == nil)
    }

    @Test("`connection` is the closing connection in its connect(false), as knet_client_conn (README), nil after it")
    func connectionCurrentInOwnDisconnect() throws {
        let server = try ServerHarness(handler: RecordingHandler(onConnect: { $0.close() }), codec: nil)
        let box = Locked<TCPClient?>(nil)
        let seen = Locked<[Bool]>([]) // per connect(false): was `connection` that connection?
        final class Handler: TCPHandler {
            let box: Locked<TCPClient?>
            let seen: Locked<[Bool]>
            init(box: Locked<TCPClient?>, seen: Locked<[Bool]>) { self.box = box; self.seen = seen }
            func connect(_ conn: TCPConnection, connected: Bool) {
                guard !connected, let client = box.withLock({ $0 }) else { return }
                let current = client.connection
                seen.withLock { $0.append(current === conn) }
                client.close()
            }
        }
        let client = TCPClient("127.0.0.1:\(server.port)")
        box.withLock { $0 = client }
        let serving = Background { try client.dialAndServe(handler: Handler(box: box, seen: seen), codec: nil) }
        #expect(serving.join() as? KNetError == .clientClosed)
        #expect(seen.withLock { $0 } == [true])
        #expect(client.connection == nil)
        box.withLock { $0 = nil }
        #expect(server.stop() == .serverClosed)
    }

    @Test("close() and shutdown(timeout:) in the connect(false) of a dropped connection: no re-dial, clientClosed")
    func closeInOwnDisconnect() throws {
        for graceful in [false, true] {
            let server = try ServerHarness(handler: RecordingHandler(onConnect: { $0.close() }), codec: nil)
            let box = Locked<TCPClient?>(nil)
            let handler = AlternationHandler(onDown: {
                let client = box.withLock { $0 }
                if graceful { client?.shutdown(timeout: .seconds(1)) } else { client?.close() }
            })
            let client = TCPClient("127.0.0.1:\(server.port)")
            box.withLock { $0 = client }
            client.enableRetry()
            let serving = Background { try client.dialAndServe(handler: handler, codec: nil) }
            #expect(serving.join() as? KNetError == .clientClosed)
            #expect(handler.snapshot.ups == 1 && handler.snapshot.downs == 1)
            box.withLock { $0 = nil }
            #expect(server.stop() == .serverClosed)
        }
    }

    @Test("shutdown(timeout:) before or during a 30 s backoff ends dialAndServe at once")
    func shutdownDuringBackoff() throws {
        let reserved = try ReservedPort()
        let client = TCPClient("127.0.0.1:\(reserved.port)")
        client.enableRetry()
        client.setRetryBackoff(initial: .seconds(30), max: .seconds(60))
        let serving = Background { try client.dialAndServe(handler: nil, codec: nil) }
        client.shutdown(timeout: .seconds(5))
        #expect(serving.join(timeout: 5) as? KNetError == .clientClosed)
        reserved.release()
    }
}
