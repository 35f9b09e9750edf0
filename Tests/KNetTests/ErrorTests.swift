#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

extension KNetTests {
    @Test("listenAndServe throws serverClosed after close(); a second serve call is refused")
    func serverClosed() throws {
        let server = try ServerHarness(handler: nil, codec: nil)
        #expect(server.server.port == server.port)
        #expect(throws: KNetError.busy) { try server.server.listenAndServe(handler: nil, codec: nil) }
        #expect(server.stop() == .serverClosed)
        #expect(server.server.port == server.port) // still after the close, as documented
    }

    @Test("dialAndServe throws clientClosed after close(), also with retry on and a long backoff")
    func clientClosed() throws {
        let server = try ServerHarness(handler: nil, codec: nil)
        let handler = RecordingHandler()
        let client = ClientHarness(port: server.port, handler: handler, codec: nil)
        #expect(eventually { handler.only?.connects == 1 })
        #expect(client.stop() == .clientClosed)
        #expect(handler.only?.disconnects == 1)
        #expect(handler.only?.reasonAtDisconnect == .error(.clientClosed))
        #expect(server.stop() == .serverClosed)

        // With retry on and a 30 s backoff, close() ends it at once, before or after the
        // first dial (the C tests test_close_during_backoff and
        // test_client_close_while_backing_off wait until the backoff itself has begun).
        let reserved = try ReservedPort()
        let retrying = TCPClient("127.0.0.1:\(reserved.port)")
        retrying.enableRetry()
        retrying.setRetryBackoff(initial: .seconds(30), max: .seconds(60))
        let serving = Background { try retrying.dialAndServe(handler: nil, codec: nil) }
        retrying.close()
        #expect(serving.join(timeout: 5) as? KNetError == .clientClosed)
        reserved.release() // held to here: Swift may end an object's life at its last use
    }

    @Test("a failed dial without retry throws the system error")
    func dialRefused() throws {
        let reserved = try ReservedPort()
        let client = TCPClient("127.0.0.1:\(reserved.port)")
        #expect(throws: KNetError.system(errno: ECONNREFUSED)) { try client.dialAndServe(handler: nil, codec: nil) }
        reserved.release()
    }

    @Test("a bad address is reported by listenAndServe")
    func invalidAddress() throws {
        let server = TCPServer("127.0.0.1:notaport")
        #expect(throws: KNetError.invalidAddress) { try server.listenAndServe(handler: nil, codec: nil) }
    }

    @Test("send throws pendingSendFull at the pending-send limit")
    func pendingSendFull() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)  // never reads
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        conn.setPendingSend(2)
        let message = [UInt8](repeating: 7, count: 256 * 1024)
        #expect(try sendUntilError(conn, message, attempts: 2000) == .pendingSendFull)
        conn.close()
        #expect(throws: KNetError.connectionClosed) { try conn.send(message) }
        #expect(server.stop() == .serverClosed)
        _ = peer
    }

    @Test("errors describe themselves and round-trip through their C codes")
    func errorDescriptions() {
        let all: [KNetError] = [.serverClosed, .clientClosed, .pendingSendFull, .connectionClosed, .invalidAddress,
                                .resolveFailed, .codec, .endOfStream, .busy, .system(errno: ECONNREFUSED)]
        for error in all {
            #expect(KNetError(code: error.code) == error)
            #expect(!error.description.isEmpty)
        }
        #expect(Set(all.map(\.description)).count == all.count)
        #expect(KNetError.system(errno: ECONNREFUSED).description == String(cString: strerror(ECONNREFUSED)))
        // Any Int32 maps without trapping, the extremes included.
        #expect(KNetError(code: Int32.min) == .system(errno: Int32.min))
        #expect(KNetError(code: Int32.min).code == Int32.min)
        #expect(KNetError(code: Int32.max) == .system(errno: Int32.max))
    }

    @Test("the client retries until a server appears")
    func clientRetry() throws {
        let reserved = try ReservedPort()
        let port = reserved.port
        let clientHandler = RecordingHandler()
        let client = ClientHarness(port: port, handler: clientHandler, codec: nil, retry: true)
        // Several backoff periods (20, 40, 80 ms) pass with nothing listening: the client
        // is still dialing, dialAndServe has not given up.
        #expect(!eventually(.milliseconds(150)) { client.serving.isFinished })
        #expect(clientHandler.connectionCount == 0)
        let serverHandler = RecordingHandler()
        reserved.release() // the server takes the port over
        let server = TCPServer("127.0.0.1:\(port)")
        let serving = Background { try server.listenAndServe(handler: serverHandler, codec: nil) }
        #expect(eventually { clientHandler.only?.connects == 1 && serverHandler.only?.connects == 1 })
        #expect(client.stop() == .clientClosed)
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
    }

    /// With no descriptor left a TCPClient is still made (it opens none); dialAndServe
    /// throws EMFILE (its wake-up descriptor) instead of the process trapping.
    @Test("TCPClient out of descriptors: made, dialAndServe throws EMFILE")
    func clientOutOfDescriptors() async {
        await #expect(processExitsWith: .success) {
            // In a child process: the soft limit lowered to the lowest free descriptor.
            let probe = open("/dev/null", O_RDONLY)
            precondition(probe >= 0)
            close(probe)
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            var saved = limit
            limit.rlim_cur = rlim_t(probe)
            precondition(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0)
            let client = TCPClient("127.0.0.1:1")
            let status: Int32
            do {
                try client.dialAndServe()
                status = 2
            } catch KNetError.system(errno: EMFILE) {
                status = 0
            } catch {
                status = 3
            }
            // The limit back before exiting: LeakSanitizer's check at exit
            // (scripts/swift-sanitize.sh address) needs descriptors, and fails the process without them.
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved)
            exit(status)
        }
    }
}
