#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

extension KNetTests {
    @Test("server shutdown(timeout:) delivers queued bytes, waits for the peer, then returns serverClosed")
    func serverGracefulShutdown() throws {
        let payload = pattern(3 << 20)
        let handler = RecordingHandler(onConnect: { conn in try? conn.send(payload) })
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.connects == 1 })
        server.server.shutdown(timeout: .seconds(10))
        var received: [UInt8] = []
        try peer.readToEnd { received += $0 }
        #expect(received == payload)
        // The server still waits for this peer to close its side.
        #expect(handler.only?.disconnects == 0)
        peer.shutdownWrite()
        #expect(server.serving.join() as? KNetError == .serverClosed)
        #expect(handler.only?.disconnects == 1)
        // A graceful close that completed is a local close.
        #expect(handler.only?.reasonAtDisconnect == .local)
    }

    @Test("close() before listenAndServe makes it throw serverClosed at once")
    func closeBeforeServing() {
        let server = TCPServer("127.0.0.1:0")
        server.close()
        #expect(throws: KNetError.serverClosed) { try server.listenAndServe(handler: nil, codec: nil) }
    }

    @Test("stats count connections and bytes; the connection limit refuses the extra one")
    func statsAndConnectionLimit() throws {
        let handler = RecordingHandler(echo: true)
        let server = TCPServer("127.0.0.1:0")
        server.setMaxConnections(1)
        let serving = Background { try server.listenAndServe(handler: handler, codec: nil) }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let first = try PlainSocket(port: port)
        try first.write([1, 2, 3])
        #expect(try first.read(exactly: 3) == [1, 2, 3])
        let second = try PlainSocket(port: port)
        #expect(try second.read() == [], "the second connection is closed at once")
        #expect(eventually { server.stats.refused == 1 })
        let stats = server.stats
        #expect(stats.live == 1)
        #expect(stats.accepted == 1)
        #expect(stats.bytesIn == 3)
        #expect(eventually { server.stats.bytesOut == 3 }) // counted after the write returned
        #expect(handler.connectionCount == 1)
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
        #expect(server.stats.live == 0)
    }

    @Test("the idle timeout closes a silent connection with ETIMEDOUT")
    func idleTimeout() throws {
        let handler = RecordingHandler()
        let server = TCPServer("127.0.0.1:0")
        server.setIdleTimeout(.milliseconds(100))
        let serving = Background { try server.listenAndServe(handler: handler, codec: nil) }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let peer = try PlainSocket(port: port)
        #expect(try peer.read() == [])
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
        #expect(server.stats.idleClosed == 1)
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
    }

    @Test("a peer that half-closes and never reads is closed as idle: ETIMEDOUT, idleClosed")
    func halfClosedPeerIsIdle() throws {
        let payload = [UInt8](repeating: 7, count: 16 << 20)
        let handler = RecordingHandler(onConnect: { conn in try? conn.send(payload) })
        let server = TCPServer("127.0.0.1:0")
        server.setIdleTimeout(.milliseconds(200))
        let serving = Background { try server.listenAndServe(handler: handler, codec: nil) }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let peer = try PlainSocket(port: port) // never reads
        #expect(eventually { handler.only?.connects == 1 })
        let start = ContinuousClock.now
        peer.shutdownWrite()
        #expect(eventually { handler.only?.disconnects == 1 })
        // Within 2 x the idle timeout and a loaded machine's slack, not the EOF drain's 3 s.
        #expect(ContinuousClock.now - start < .milliseconds(2 * 200 + 1500))
        #expect(handler.only?.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
        #expect(server.stats.idleClosed == 1)
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
    }

    @Test("setMaxQueuedBytes bounds the queue: pendingSendFull beyond it")
    func maxQueuedBytes() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)  // never reads
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        conn.setMaxQueuedBytes(1 << 20)
        let message = [UInt8](repeating: 1, count: 64 * 1024)
        #expect(try sendUntilError(conn, message, attempts: 2000) == .pendingSendFull)
        #expect(server.stop() == .serverClosed)
        _ = peer
    }

    @Test("a client's idle timeout and queue bound apply to the connection it dials")
    func clientLimits() throws {
        let peer = try SilentListener()
        let handler = RecordingHandler()
        let client = TCPClient("127.0.0.1:\(peer.port)")
        client.disableRetry()
        client.setIdleTimeout(.seconds(1))
        client.setMaxQueuedBytes(1 << 20)
        let serving = Background { try client.dialAndServe(handler: handler, codec: nil) }
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        let message = [UInt8](repeating: 1, count: 64 * 1024)
        // 16 MiB at most: past 1 MiB plus the kernel's buffers, short of 64 MiB.
        #expect(try sendUntilError(conn, message, attempts: 256) == .pendingSendFull)
        // Nothing moves after that: the idle timeout ends the connection (and the
        // persistent client dials again).
        #expect(eventually { handler.snapshot.connections[0]?.disconnects == 1 })
        #expect(handler.snapshot.connections[0]?.reasonAtDisconnect == .error(.system(errno: ETIMEDOUT)))
        client.close()
        #expect(serving.join() as? KNetError == .clientClosed)
        #expect(handler.snapshot.contractFailures == 0)
    }

    @Test("client shutdown(timeout:) ends dialAndServe with clientClosed after a graceful close")
    func clientGracefulShutdown() throws {
        let serverHandler = RecordingHandler()
        let server = try ServerHarness(handler: serverHandler, codec: StdCodec())
        let clientHandler = RecordingHandler()
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: StdCodec())
        #expect(eventually { client.client.connection != nil })
        let conn = try #require(client.client.connection)
        for index in 0..<100 { try conn.send(pattern(1000, offset: index)) }
        client.client.shutdown(timeout: .seconds(10))
        // The server gets every queued message, then EOF, and closes its side.
        #expect(client.serving.join() as? KNetError == .clientClosed)
        #expect(serverHandler.only?.messages.count == 100)
        #expect(eventually { serverHandler.only?.reasonAtDisconnect == .error(.endOfStream) })
        #expect(clientHandler.only?.disconnects == 1)
        #expect(server.stop() == .serverClosed)
    }
}
