// Arguments at the edges of what the Swift API documents: address strings the C core
// must not see cut short.
import KNet
import Testing

extension KNetTests {
    @Test("an address with an embedded NUL is invalid, not the part before the NUL")
    func embeddedNulAddress() throws {
        // Cut at the NUL, this server would listen on 127.0.0.1 with a kernel-chosen port.
        let server = TCPServer("127.0.0.1:0\u{0}junk")
        let serving = Background { try server.listenAndServe() }
        #expect(throws: KNetError.invalidAddress) { try server.waitUntilListening(timeout: .seconds(10)) }
        server.close()
        #expect(serving.join() as? KNetError == .invalidAddress)

        // Cut at the NUL, this client would dial (and be served by) target.
        let target = try ServerHarness(handler: nil, codec: nil)
        let client = TCPClient("127.0.0.1:\(target.port)\u{0}junk")
        let dialing = Background { try client.dialAndServe() }
        #expect(eventually { dialing.isFinished || target.server.stats.accepted > 0 })
        #expect(target.server.stats.accepted == 0)
        client.close()
        #expect(dialing.join() as? KNetError == .invalidAddress)
        #expect(target.stop() == .serverClosed)
    }
}
