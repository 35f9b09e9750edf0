#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
import Synchronization
import Testing

// The Swift API used the way a Swift 6 service uses it: async/await, actors, Tasks,
// cancellation. The blocking calls (listenAndServe, dialAndServe, waitUntilListening, a
// plain socket's reads) run on threads of their own, never on the cooperative pool, which
// Swift Testing itself runs on.

/// Runs a blocking call on a thread of its own and awaits its outcome.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}

/// A service actor that owns its server: callbacks hop onto it with `Task { await ... }`
/// and it answers with `conn.send` from its own executor.
actor EchoService {
    let server = TCPServer("127.0.0.1:0")
    private(set) var answered = 0
    private(set) var refused: [KNetError] = []

    private(set) var connections: [TCPConnection] = []

    func handle(_ conn: TCPConnection, _ message: [UInt8]) {
        if !connections.contains(where: { $0 === conn }) {
            conn.userdata = Int(message.first ?? 0) // the peer's index
            connections.append(conn)
        }
        do {
            try conn.send(message)
            answered += 1
        } catch let error as KNetError {
            refused.append(error)
        } catch {
            Issue.record("send threw a non-KNetError: \(error)")
        }
    }

    /// Serves until the server closes; returns what listenAndServe threw.
    func run() async -> KNetError? {
        let server = server
        let handler = HopHandler(service: self)
        do {
            try await offPool { try server.listenAndServe(handler: handler, codec: StdCodec()) }
            return nil
        } catch {
            return error as? KNetError
        }
    }

    func port() async throws -> Int {
        let server = server
        return try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
    }

    func stop() { server.close() }
    func drain(timeout: Duration) { server.shutdown(timeout: timeout) }
}

struct HopHandler: TCPHandler {
    let service: EchoService
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        Task { await service.handle(conn, buf) }
    }
}

/// Counts instances alive (userdata lifetime checks).
final class Token: Sendable {
    static let live = Atomic<Int>(0)
    let tag: Int
    init(_ tag: Int) {
        self.tag = tag
        Self.live.add(1, ordering: .relaxed)
    }
    deinit { Self.live.subtract(1, ordering: .relaxed) }
}

/// A plain peer handed to one blocking thread at a time (never used concurrently).
struct PeerBox: @unchecked Sendable {
    let peer: PlainSocket
}

/// StdCodec framing for a plain peer.
func stdFrame(_ body: [UInt8]) -> [UInt8] {
    [UInt8(body.count >> 8), UInt8(body.count & 0xff)] + body
}

/// Keeps every connection and signals connect(false) to awaiting tasks.
final class AwaitableHandler: TCPHandler {
    let conns = Locked<[TCPConnection]>([])
    let downs = Locked(0)
    let onReceive: (@Sendable (TCPConnection, [UInt8]) -> Void)?
    init(onReceive: (@Sendable (TCPConnection, [UInt8]) -> Void)? = nil) { self.onReceive = onReceive }
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { conns.withLock { $0.append(conn) } } else { downs.withLock { $0 += 1 } }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) { onReceive?(conn, buf) }

    /// Awaits (polling, bounded) until `condition` holds, without blocking a pool thread.
    func until(_ timeout: Duration = .seconds(10), _ condition: @Sendable (AwaitableHandler) -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while !condition(self) {
            if ContinuousClock.now >= deadline { return condition(self) }
            try? await Task.sleep(for: .milliseconds(1))
        }
        return true
    }
}

/// Polls an async condition (bounded) without blocking a pool thread.
func eventuallyAsync(_ timeout: Duration = .seconds(10), _ condition: () async -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while await !condition() {
        if ContinuousClock.now >= deadline { return await condition() }
        try? await Task.sleep(for: .milliseconds(1))
    }
    return true
}

extension KNetTests {
    @Test("an actor owning a TCPServer answers from its executor: every frame echoed, then close ends the serve task")
    func actorOwnedServerEchoes() async throws {
        let service = EchoService()
        let serving = Task { await service.run() }
        let port = try await service.port()
        let count = 300
        let echoed = try await offPool { () -> [[UInt8]] in
            let peer = try PlainSocket(port: port)
            var out: [UInt8] = []
            for i in 0..<count { out += stdFrame([UInt8(i >> 8), UInt8(i & 0xff), 7]) }
            try peer.write(out)
            let bytes = try peer.read(exactly: count * 5)
            return stride(from: 0, to: bytes.count, by: 5).map { Array(bytes[$0 + 2..<$0 + 5]) }
        }
        // Tasks made in a callback are not ordered: compare as sets.
        #expect(Set(echoed.map { Int($0[0]) << 8 | Int($0[1]) }) == Set(0..<count))
        #expect(await service.answered == count)
        #expect(await service.refused.isEmpty)
        await service.stop()
        #expect(await serving.value == .serverClosed)
    }

    @Test("cancelling the task that awaits a server closes it (from a callback's loop thread too)")
    func cancellationClosesServer() async throws {
        let server = TCPServer("127.0.0.1:0")
        let task = Locked<Task<KNetError?, Never>?>(nil)
        let handler = AwaitableHandler { _, _ in
            task.withLock { $0 }?.cancel() // on the loop thread: runs the cancellation handler there
        }
        let serving = Task { () -> KNetError? in
            do {
                try await withTaskCancellationHandler {
                    try await offPool { try server.listenAndServe(handler: handler) }
                } onCancel: {
                    server.close()
                }
                return nil
            } catch {
                return error as? KNetError
            }
        }
        task.withLock { $0 = serving }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        let peer = PeerBox(peer: try PlainSocket(port: port))
        try peer.peer.write([1])
        #expect(await serving.value == .serverClosed)
        // listenAndServe returned only after every connect(false) ran.
        #expect(handler.downs.withLock { $0 } == 1)
        #expect(try await offPool { try peer.peer.read() } == [])
    }

    @Test("a connection used from other tasks after connect(false): every call throws .connectionClosed or is harmless",
          arguments: ChurnCodec.allCases)
    func useAfterDisconnectFromTasks(codec: ChurnCodec) async throws {
        let server = TCPServer("127.0.0.1:0")
        let handler = AwaitableHandler()
        let serving = Task { try await offPool { try server.listenAndServe(handler: handler, codec: codec.make()) } }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        do {
            let peer = try PlainSocket(port: port)
            #expect(await handler.until { $0.conns.withLock { $0.count } == 1 })
            _ = peer
        } // the peer closes
        #expect(await handler.until { $0.downs.withLock { $0 } == 1 })
        let conn = try #require(handler.conns.withLock { $0.first })
        // connect(false) is counted inside it; the userdata is dropped once it returned.
        #expect(await eventuallyAsync { conn.userdata = Token(-1); return conn.userdata == nil })
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                group.addTask {
                    for _ in 0..<50 {
                        #expect(throws: KNetError.connectionClosed) { try conn.send([UInt8(t)]) }
                        #expect(throws: KNetError.connectionClosed) { try conn.send([UInt8(t), 1][1...]) }
                        #expect(throws: KNetError.connectionClosed) {
                            try [UInt8(t)].withUnsafeBytes { try conn.send($0) }
                        }
                        #expect(throws: KNetError.connectionClosed) { try conn.setNoDelay(true) }
                        conn.userdata = Token(t)
                        #expect(conn.userdata == nil)
                        conn.setPendingSend(t)
                        conn.setMaxQueuedBytes(t)
                        conn.shutdown()
                        conn.close(timeout: .milliseconds(t))
                        conn.close()
                        #expect(conn.closeReason == .error(.endOfStream))
                        _ = conn.localAddress
                        _ = conn.remoteAddress
                    }
                }
            }
        }
        #expect(Token.live.load(ordering: .relaxed) == 0)
        server.close()
        await #expect(throws: KNetError.serverClosed) { try await serving.value }
    }

    @Test("once server.close() returned in one task, sends from every other task throw .connectionClosed")
    func sendsAfterServerCloseFromTasks() async throws {
        let server = TCPServer("127.0.0.1:0")
        let handler = AwaitableHandler()
        let serving = Task { try await offPool { try server.listenAndServe(handler: handler, codec: StdCodec()) } }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        var peers: [PlainSocket] = []
        for _ in 0..<4 { peers.append(try PlainSocket(port: port)) }
        #expect(await handler.until { $0.conns.withLock { $0.count } == 4 })
        let conns = handler.conns.withLock { $0 }
        await Task.detached { server.close() }.value
        await withTaskGroup(of: Void.self) { group in
            for conn in conns {
                group.addTask {
                    #expect(throws: KNetError.connectionClosed) { try conn.send([1, 2, 3]) }
                }
            }
        }
        await #expect(throws: KNetError.serverClosed) { try await serving.value }
        #expect(handler.downs.withLock { $0 } == 4)
        _ = peers
    }

    @Test("an actor's sends racing its graceful shutdown: every accepted frame reaches the peer, in order, before EOF")
    func actorSendsThenShutdownLoseNothing() async throws {
        let service = EchoService()
        let serving = Task { await service.run() }
        let port = try await service.port()
        let peers = try (0..<3).map { _ in PeerBox(peer: try PlainSocket(port: port)) }
        // Each peer reads to EOF, then closes its side (which ends the graceful close).
        let readers = peers.map { peer in
            Task { try await offPool { () -> [UInt8] in
                var bytes: [UInt8] = []
                try peer.peer.readToEnd { bytes += $0 }
                peer.peer.shutdownWrite()
                return bytes
            } }
        }
        // One frame from each peer gives the service its connections (echoed back).
        for (i, peer) in peers.enumerated() { try peer.peer.write(stdFrame([UInt8(i), 0, 0])) }
        #expect(await eventuallyAsync { await service.answered == 3 })
        let conns = await service.connections
        #expect(conns.count == 3)
        // Tasks send numbered frames to every connection while another task shuts down.
        let accepted = await withTaskGroup(of: [Int: Int].self) { group in
            for (c, conn) in conns.enumerated() {
                group.addTask {
                    let peer = conn.userdata as? Int ?? -1 // before the connection can end
                    var sent = 0
                    for i in 1...2000 {
                        do { try conn.send([UInt8(c), UInt8(i >> 8), UInt8(i & 0xff)]) } catch { break }
                        sent = i
                        if i % 64 == 0 { await Task.yield() }
                    }
                    return [peer: sent]
                }
            }
            group.addTask {
                await Task.yield()
                await service.drain(timeout: .seconds(20))
                return [:]
            }
            return await group.reduce(into: [:]) { $0.merge($1) { a, _ in a } }
        }
        #expect(await serving.value == .serverClosed)
        for (p, reader) in readers.enumerated() {
            let bytes = try await reader.value
            let frames = stride(from: 0, to: bytes.count, by: 5).map { Array(bytes[$0 + 2..<min($0 + 5, bytes.count)]) }
            #expect(bytes.count % 5 == 0)
            #expect(frames.first == [UInt8(p), 0, 0])
            let numbers = frames.dropFirst().map { Int($0[1]) << 8 | Int($0[2]) }
            let expected = accepted[p] ?? -1
            #expect(numbers == Array(0..<max(0, expected)).map { $0 + 1 }, "peer \(p): \(numbers.count) frames, \(expected) accepted")
        }
    }

    @Test("userdata set from many tasks while the connection closes: every value is released by connect(false), the connection too")
    func userdataFromTasksReleased() async throws {
        weak var weakConn: TCPConnection?
        weak var lastToken: Token?
        let server = TCPServer("127.0.0.1:0")
        do {
            let handler = AwaitableHandler { conn, _ in conn.userdata = Token(-1) }
            let serving = Task { try await offPool { try server.listenAndServe(handler: handler) } }
            let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
            let peer = try PlainSocket(port: port)
            try peer.write([1])
            #expect(await handler.until { $0.conns.withLock { $0.count } == 1 })
            let conn = try #require(handler.conns.withLock { $0.first })
            weakConn = conn
            await withTaskGroup(of: Void.self) { group in
                for t in 0..<8 {
                    group.addTask {
                        for i in 0..<200 {
                            conn.userdata = Token(t * 1000 + i)
                            if let token = conn.userdata as? Token { _ = token.tag }
                            if t == 0 && i == 100 { conn.close() }
                        }
                    }
                }
            }
            #expect(await handler.until { $0.downs.withLock { $0 } == 1 })
            // connect(false) is counted inside it; the userdata is dropped once it returned.
            #expect(await eventuallyAsync { conn.userdata = Token(-1); return conn.userdata == nil })
            let token = Token(42)
            lastToken = token
            conn.userdata = token
            #expect(conn.userdata == nil)
            // Only `token`, held here (the last dropped one is freed just after the drop).
            #expect(await eventuallyAsync { Token.live.load(ordering: .relaxed) == 1 })
            server.close()
            await #expect(throws: KNetError.serverClosed) { try await serving.value }
            handler.conns.withLock { $0 = [] }
        }
        #expect(lastToken == nil)
        #expect(weakConn == nil)
        #expect(Token.live.load(ordering: .relaxed) == 0)
    }

    @Test("a client driven from tasks: connection seen from another task, nil after close, its sends throw .connectionClosed")
    func clientFromTasks() async throws {
        let echo = try ServerHarness(handler: RecordingHandler(echo: true), codec: StdCodec())
        let client = TCPClient("127.0.0.1:\(echo.port)")
        client.disableRetry()
        let received = AwaitableHandler()
        let dialing = Task { try await offPool { try client.dialAndServe(handler: received, codec: StdCodec()) } }
        #expect(await received.until { _ in client.connection != nil })
        let conn = try #require(client.connection)
        try await Task.detached { try conn.send([9, 9]) }.value
        await Task.detached { client.close() }.value
        await #expect(throws: KNetError.clientClosed) { try await dialing.value }
        #expect(client.connection == nil)
        #expect(received.downs.withLock { $0 } == 1)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<4 {
                group.addTask { #expect(throws: KNetError.connectionClosed) { try conn.send([1]) } }
            }
        }
        #expect(echo.stop() == .serverClosed)
    }

    @Test("KNetError crosses task boundaries as the documented case and compares equal")
    func errorsAcrossTasks() async {
        let bad = TCPServer("not an address")
        let result = await Task.detached { () -> Result<Void, KNetError> in
            do { try bad.listenAndServe() } catch let error as KNetError { return .failure(error) } catch {
                return .failure(.codec)
            }
            return .success(())
        }.value
        #expect(throws: KNetError.invalidAddress) { try result.get() }
        let closed = TCPServer("127.0.0.1:0")
        closed.close()
        let waited = await Task.detached { () -> KNetError? in
            do { try closed.waitUntilListening(timeout: .seconds(5)); return nil } catch { return error as? KNetError }
        }.value
        #expect(waited == .serverClosed)
    }

    @Test("16 tasks drive a server, its connections and a client at once while the server closes (run under TSan)",
          arguments: ChurnCodec.allCases)
    func manyTasksAtOnce(codec: ChurnCodec) async throws {
        let server = TCPServer("127.0.0.1:0")
        let handler = AwaitableHandler { conn, buf in
            conn.userdata = buf.count
            try? conn.send(buf)
        }
        let serving = Task { try await offPool { try server.listenAndServe(handler: handler, codec: codec.make()) } }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        let client = TCPClient("127.0.0.1:\(port)")
        client.enableRetry()
        client.setRetryBackoff(initial: .milliseconds(5), max: .milliseconds(20))
        let clientHandler = AwaitableHandler()
        let dialing = Task { try await offPool { try client.dialAndServe(handler: clientHandler, codec: codec.make()) } }
        #expect(await handler.until { $0.conns.withLock { $0.count } >= 1 })
        let message = [UInt8](repeating: 3, count: 3) // a whole ThreeByteCodec frame too
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<16 {
                group.addTask {
                    for i in 0..<200 {
                        if t == 0 && i == 150 { server.close() }
                        if let conn = client.connection {
                            _ = try? conn.send(message)
                            conn.userdata = Token(i)
                            _ = conn.userdata
                        }
                        for conn in handler.conns.withLock({ $0 }) {
                            _ = try? conn.send(message)
                            _ = conn.userdata
                            conn.userdata = Token(t)
                            _ = conn.closeReason
                            _ = conn.localAddress
                            _ = conn.remoteAddress
                            conn.setPendingSend(0)
                            conn.setMaxQueuedBytes(1 << 20)
                            _ = try? conn.setNoDelay(i % 2 == 0)
                            _ = String(describing: conn)
                            if i == 100 + t { t % 2 == 0 ? conn.close() : conn.close(timeout: .milliseconds(t)) }
                        }
                        _ = server.stats
                        _ = server.port
                        if i % 16 == 0 { await Task.yield() }
                    }
                }
            }
        }
        await #expect(throws: KNetError.serverClosed) { try await serving.value }
        client.close()
        await #expect(throws: KNetError.clientClosed) { try await dialing.value }
        #expect(handler.conns.withLock { $0.count } == handler.downs.withLock { $0 })
        #expect(clientHandler.conns.withLock { $0.count } == clientHandler.downs.withLock { $0 })
        handler.conns.withLock { $0 = [] }
        clientHandler.conns.withLock { $0 = [] }
        #expect(Token.live.load(ordering: .relaxed) == 0)
    }

    @Test("doc promises seen from tasks: closeReason per close path, localAddress after close, port after close, a wait begun before serving")
    func docPromisesFromTasks() async throws {
        let server = TCPServer("127.0.0.1:0")
        // A wait begun before listenAndServe starts sees the listen.
        let waiting = Task { try await offPool { try server.waitUntilListening(timeout: .seconds(10)) } }
        try await Task.sleep(for: .milliseconds(20))
        let handler = AwaitableHandler()
        let serving = Task { try await offPool { try server.listenAndServe(handler: handler) } }
        let port = try await waiting.value
        #expect(port == server.port && port > 0)
        var peers: [PlainSocket] = []
        for _ in 0..<3 { peers.append(try PlainSocket(port: port)) }
        #expect(await handler.until { $0.conns.withLock { $0.count } == 3 })
        let conns = handler.conns.withLock { $0 }
        #expect(conns.allSatisfy { $0.closeReason == .open })
        let local0 = conns[0].localAddress // read while open
        #expect(local0 == "127.0.0.1:\(port)")
        await Task.detached { conns[1].close() }.value
        #expect(await handler.until { $0.downs.withLock { $0 } == 1 })
        #expect(conns[1].closeReason == .local)
        peers[2] = try PlainSocket(port: port) // drops the third peer: EOF
        #expect(await handler.until { $0.downs.withLock { $0 } == 2 })
        let third = conns[2]
        #expect(third.closeReason == .error(.endOfStream))
        #expect(third.localAddress == nil) // never read while open
        server.close()
        await #expect(throws: KNetError.serverClosed) { try await serving.value }
        #expect(conns[0].closeReason == .error(.serverClosed))
        #expect(conns[0].localAddress == local0)
        #expect(server.port == port)
    }

    @Test("waitUntilListening called in a callback, for a server starting on a thread: on the callback's own loop it can only time out")
    func waitUntilListeningInCallback() async throws {
        let loops = loopThreadCount
        let others = (0..<loops).map { _ in TCPServer("127.0.0.1:0") }
        let servings = Locked<[Background]>([])
        let results = Locked<[Result<Int, KNetError>]>([])
        let handler = AwaitableHandler { conn, _ in
            // Each listenAndServe takes the next loop in turn: one of them is this one.
            for other in others {
                servings.withLock { $0.append(Background { try other.listenAndServe() }) }
                let result = Result { () throws(KNetError) -> Int in
                    do { return try other.waitUntilListening(timeout: .milliseconds(300)) } catch let error as KNetError {
                        throw error
                    } catch { throw .codec }
                }
                results.withLock { $0.append(result) }
            }
            try? conn.send([1])
        }
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = PeerBox(peer: try PlainSocket(port: server.port))
        try peer.peer.write([0])
        #expect(try await offPool { try peer.peer.read(exactly: 1) } == [1])
        let outcome = results.withLock { $0 }
        #expect(outcome.count == loops)
        // The one whose listener waits for this loop timed out, though it listens right after.
        let timedOut = outcome.indices.filter { outcome[$0] == .failure(.system(errno: ETIMEDOUT)) }
        #expect(timedOut.count == 1, "\(outcome)")
        for (i, other) in others.enumerated() {
            #expect(try await offPool { try other.waitUntilListening(timeout: .seconds(10)) } > 0, "server \(i)")
            other.close()
        }
        for serving in servings.withLock({ $0 }) { #expect(serving.join() as? KNetError == .serverClosed) }
        #expect(server.stop() == .serverClosed)
    }

    @Test("received arrays handed to an actor by Tasks stay intact while the loop reads on (hand-over storage not reused under them)",
          arguments: ChurnCodec.allCases)
    func receivedArraysKeptByActor(codec: ChurnCodec) async throws {
        actor Store {
            var parts: [Int: [UInt8]] = [:]
            func put(_ seq: Int, _ bytes: [UInt8]) {
                // Read it only now, later, on another thread.
                parts[seq] = bytes
            }
            func joined() -> [UInt8] { parts.keys.sorted().flatMap { parts[$0]! } }
            var count: Int { parts.count }
        }
        let store = Store()
        let sequence = Atomic<Int>(0)
        let handler = AwaitableHandler { _, buf in
            let seq = sequence.add(1, ordering: .relaxed).oldValue
            Task { await store.put(seq, buf) }
        }
        let server = try ServerHarness(handler: handler, codec: codec.make())
        let total = 3 << 20
        let body = pattern(total)
        var wire: [UInt8] = []
        var cut = 0
        while cut < total { // messages of 1 to 60000 bytes
            let size = min(total - cut, 1 + cut * 31 % 60_000)
            wire += codec.frame(Array(body[cut..<cut + size]))
            cut += size
        }
        try await offPool { [wire] in
            let peer = try PlainSocket(port: server.port)
            var offset = 0
            var step = 700
            while offset < wire.count {
                let end = min(wire.count, offset + step)
                try peer.write(Array(wire[offset..<end]))
                offset = end
                step = step * 7 % 65_521 + 100 // read sizes across the spare's thresholds
            }
        }
        #expect(await eventuallyAsync { await store.count == sequence.load(ordering: .relaxed) && handler.downs.withLock { $0 } == 1 })
        let joined = await store.joined()
        #expect(joined.count == total)
        #expect(joined == body)
        #expect(server.stop() == .serverClosed)
    }

    @Test("documented errors from tasks: a second dialAndServe is .busy, a taken port is EADDRINUSE (port 0), loop count .busy")
    func documentedErrorsFromTasks() async throws {
        let echo = try ServerHarness(handler: RecordingHandler(echo: true), codec: nil)
        let client = TCPClient("127.0.0.1:\(echo.port)")
        let handler = AwaitableHandler()
        let dialing = Task { try await offPool { try client.dialAndServe(handler: handler) } }
        #expect(await handler.until { $0.conns.withLock { $0.count } == 1 })
        let second = await Task.detached { () -> KNetError? in
            do { try client.dialAndServe(); return nil } catch { return error as? KNetError }
        }.value
        #expect(second == .busy)
        #expect(await Task.detached { () -> KNetError? in
            do { try setLoopThreads(1); return nil } catch { return error as? KNetError }
        }.value == .busy)
        let taken = TCPServer("127.0.0.1:\(echo.port)")
        let failed = await Task.detached { () -> KNetError? in
            do { try taken.listenAndServe(); return nil } catch { return error as? KNetError }
        }.value
        #expect(failed == .system(errno: EADDRINUSE))
        #expect(taken.port == 0)
        #expect(throws: KNetError.system(errno: EADDRINUSE)) { try taken.waitUntilListening(timeout: .seconds(1)) }
        client.close()
        await #expect(throws: KNetError.clientClosed) { try await dialing.value }
        #expect(throws: KNetError.clientClosed) { try client.dialAndServe() }
        #expect(echo.stop() == .serverClosed)
    }
}
