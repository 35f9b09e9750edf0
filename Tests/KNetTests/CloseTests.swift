#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// The ways a server-side connection can end.
enum ClosePath: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case peerClose, localClose, closeInsideReceive, shutdown, forcedTimeout, serverClose, codecError

    var testDescription: String { rawValue }

    var expectedReason: CloseReason {
        switch self {
        case .peerClose: return .error(.endOfStream)
        case .localClose, .closeInsideReceive, .shutdown: return .local
        case .forcedTimeout: return .error(.system(errno: ETIMEDOUT))
        case .serverClose: return .error(.serverClosed)
        case .codecError: return .error(.codec)
        }
    }
}

extension KNetTests {
    @Test("connect(true) and connect(false) arrive exactly once on every close path", arguments: ClosePath.allCases)
    func closePath(path: ClosePath) throws {
        let handler = RecordingHandler(onReceive: { conn, buf in
            switch path {
            case .closeInsideReceive: conn.close()
            case .shutdown: conn.shutdown()
            default: break
            }
        })
        let codec: (any Codec)? = path == .codecError ? LengthFieldCodec(lengthBytes: 2, maxFrame: 10) : nil
        let server = try ServerHarness(handler: handler, codec: codec)
        var peer: PlainSocket? = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        #expect(conn.closeReason == .open)
        #expect(conn.remoteAddress?.hasPrefix("127.0.0.1:") == true)
        #expect(conn.localAddress == "127.0.0.1:\(server.port)")

        switch path {
        case .peerClose:
            peer = nil
        case .localClose:
            conn.close()
        case .closeInsideReceive, .shutdown:
            try peer?.write([1])
            if path == .shutdown {
                // A graceful close half-closes; it completes when the peer closes too.
                #expect(try peer?.read() == [])
                peer = nil
            }
        case .forcedTimeout:
            // The peer sees EOF but never closes: the timeout forces the close.
            conn.close(timeout: .milliseconds(200))
            #expect(try peer?.read() == [])
        case .serverClose:
            server.server.close()
        case .codecError:
            try peer?.write([0, 11])  // an 11-byte frame where 10 is the maximum
        }
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(server.stop() == .serverClosed)
        // listenAndServe returned, so every callback has run: counts are final now.
        let record = try #require(handler.only)
        #expect(record.connects == 1)
        #expect(record.disconnects == 1)
        #expect(record.reasonAtDisconnect == path.expectedReason)
        #expect(conn.closeReason == path.expectedReason)
        #expect(handler.snapshot.contractFailures == 0)
        // The kept connection stays a valid object, but takes no more sends.
        #expect(throws: KNetError.connectionClosed) { try conn.send([1, 2, 3]) }
        _ = peer
    }

    @Test("graceful shutdown delivers a multi-megabyte queue, then EOF")
    func gracefulShutdownDeliversQueue() throws {
        let chunk = 64 * 1024
        let chunks = 128  // 8 MiB, far more than the socket buffers hold
        let sendErrors = Locked(0)
        let handler = RecordingHandler(onConnect: { conn in
            for index in 0..<chunks {
                do { try conn.send(pattern(chunk, offset: index * chunk)) } catch { sendErrors.withLock { $0 += 1 } }
            }
            conn.shutdown()
            // Once shutdown began, sends are refused.
            do {
                try conn.send([1])
                sendErrors.withLock { $0 += 1 }
            } catch {
                if error as? KNetError != .connectionClosed { sendErrors.withLock { $0 += 1 } }
            }
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        var received = 0
        var mismatches = 0
        try peer.readToEnd { bytes in
            if bytes != pattern(bytes.count, offset: received) { mismatches += 1 }
            received += bytes.count
        }
        #expect(received == chunk * chunks)
        #expect(mismatches == 0)
        #expect(sendErrors.withLock { $0 } == 0)
        peer.shutdownWrite()
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .local)
        #expect(server.stop() == .serverClosed)
    }

    @Test("a client sees connect(false) once when the server closes, and dials again")
    func clientReconnectsAfterServerSideClose() throws {
        let serverHandler = RecordingHandler(onConnect: { conn in conn.close() })
        let server = try ServerHarness(handler: serverHandler, codec: nil)
        let clientHandler = RecordingHandler()
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: nil)
        // The persistent client dials again after each close.
        #expect(eventually { clientHandler.snapshot.connections.values.filter { $0.disconnects == 1 }.count >= 3 })
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
        for record in clientHandler.snapshot.connections.values {
            #expect(record.connects == 1)
            #expect(record.disconnects == 1)
        }
        #expect(clientHandler.snapshot.contractFailures == 0)
    }
}
