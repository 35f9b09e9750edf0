#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// A server handler that owns its server and closes it from a callback after echoing.
final class ServerOwningHandler: TCPHandler {
    let server: TCPServer
    init(server: TCPServer) { self.server = server }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        try? conn.send(buf)
        server.close()
        server.close() // twice is harmless, also from a callback
    }
}

/// A client handler that owns its client, pings in connect(true) and closes the client
/// from receive.
final class ClientOwningHandler: TCPHandler {
    let client: TCPClient
    init(client: TCPClient) { self.client = client }
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { try? conn.send([1, 2, 3]) }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        client.close()
        #expect(throws: KNetError.connectionClosed) { try conn.send([4]) }
    }
}

extension KNetTests {
    @Test("handlers that own their TCPServer / TCPClient and close them from callbacks are freed with them")
    func owningHandlersCloseFromCallbacks() throws {
        weak var weakServer: TCPServer?
        weak var weakClient: TCPClient?
        weak var weakServerHandler: ServerOwningHandler?
        weak var weakClientHandler: ClientOwningHandler?
        do {
            let server = TCPServer("127.0.0.1:0")
            let serverHandler = ServerOwningHandler(server: server)
            let serving = Background { try server.listenAndServe(handler: serverHandler) }
            let port = try server.waitUntilListening(timeout: .seconds(10))
            let client = TCPClient("127.0.0.1:\(port)")
            client.disableRetry()
            let clientHandler = ClientOwningHandler(client: client)
            let dialing = Background { try client.dialAndServe(handler: clientHandler) }
            weakServer = server
            weakClient = client
            weakServerHandler = serverHandler
            weakClientHandler = clientHandler
            #expect(serving.join() as? KNetError == .serverClosed)
            let clientError = dialing.join() as? KNetError
            #expect(clientError == .clientClosed || clientError == .system(errno: ECONNREFUSED))
        }
        #expect(eventually { weakServer == nil && weakClient == nil && weakServerHandler == nil && weakClientHandler == nil })
    }

    @Test("a TCPServer whose only other reference is dropped while it serves lives until listenAndServe returns")
    func serverDroppedWhileServing() throws {
        weak var weakServer: TCPServer?
        let serving: Background
        do {
            let server = TCPServer("127.0.0.1:0")
            weakServer = server
            serving = Background { [weak server] in try server?.listenAndServe() }
            try server.waitUntilListening(timeout: .seconds(10))
        }
        #expect(weakServer != nil) // the serve call keeps it
        weakServer?.close()
        #expect(serving.join() as? KNetError == .serverClosed)
        #expect(eventually { weakServer == nil })
    }

    @Test("dialAndServe and listenAndServe called from a handler callback throw EDEADLK at once")
    func serveCallsFromCallbackRefused() throws {
        let inner = TCPServer("127.0.0.1:0")
        let client = TCPClient("127.0.0.1:1")
        let errors = Locked<[KNetError?]>([])
        let handler = RecordingHandler(onConnect: { _ in
            var got: [KNetError?] = []
            do { try client.dialAndServe() } catch { got.append(error as? KNetError) }
            do { try inner.listenAndServe() } catch { got.append(error as? KNetError) }
            errors.withLock { $0 = got }
        })
        let harness = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: harness.port)
        withExtendedLifetime(peer) {
            #expect(eventually { errors.withLock { $0.count } == 2 })
        }
        #expect(errors.withLock { $0 } == [.system(errno: EDEADLK), .system(errno: EDEADLK)])
        #expect(harness.stop() == .serverClosed)
    }
}
