from sandboxctl.gateway.server import main

main()
